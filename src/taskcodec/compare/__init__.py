"""Rate–distortion comparisons of MLflow runs: curves, Bjøntegaard deltas, plots and tables.

Every evaluate run is one point: its rate (``bpp``, counted from real bytes, unless ``--rate``
picks another logged rate such as ``bpp_enh`` or the likelihoods' ``bpp_estimated``) and its
quality metrics (``psnr``, ``ms_ssim``, task metrics such as ``map`` or ``abs_rel``). Runs are grouped
into curves by a tag or param (``method`` unless told otherwise) and ordered by rate. For every
quality metric the runs share, each curve is compared with an anchor curve by its Bjøntegaard
deltas (G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves",
VCEG-M33, 2001): BD-rate, the average rate difference in % at equal quality, and BD-metric,
the average quality difference at equal rate. They are computed by the ``bjontegaard`` package,
with piecewise cubic Hermite interpolation by default (it keeps a monotonic set of points
monotonic between them, where a single cubic through all points may wiggle and bias the delta),
or the classic cubic fit of VCEG-M33.

Published points (a CompressAI results JSON, a CSV of bpp and metrics) and the anchors that
evaluate measured next to each run (JPEG, WebP, AVIF: Pillow) join as reference curves. The
result is a set of files (RD plots as PNG and SVG, points and BD table as CSV and JSON)
logged as artifacts of a new MLflow run tagged ``comparison=true``.

When the curves hold paper 1's baselines, every other curve of their group also gets paper 1's
share of the ideal gain (:mod:`taskcodec.ideal_gain`).

The package, by what a newcomer looks for:

- :mod:`~taskcodec.compare.curves`: points and curves (runs grouped by a tag, anchors, published
  references), replicates averaged into one point, the operational (Pareto) RD curve;
- :mod:`~taskcodec.compare.bd`: Bjøntegaard deltas and the BD table;
- :mod:`~taskcodec.compare.statistics`: intervals over replicates, paired BD per seed,
  equivalence tests;
- :mod:`~taskcodec.compare.images`: the bootstrap over images of single runs' curves;
- :mod:`~taskcodec.compare.selection`: which MLflow runs are compared;
- :mod:`~taskcodec.compare.report`: plots, CSV/JSON files, terminal and Markdown tables;
- :mod:`~taskcodec.compare.comparison`: the whole ``taskcodec compare``.
"""

from taskcodec.compare.bd import (
    BD_METHODS,
    MIN_BD_POINTS,
    BDRow,
    _check_method,
    bd_metric,
    bd_rate,
    bd_table,
    overlap,
    pick_anchor,
)
from taskcodec.compare.comparison import (
    CompareOptions,
    Comparison,
    anchor_curves,
    build_curves,
    choose_metrics,
    compare,
)
from taskcodec.compare.curves import (
    ANCHOR_CURVES,
    JPEG_CURVE,
    RATE,
    Curve,
    Point,
    aggregate_replicates,
    anchor_curve,
    check_rate,
    curves_from_runs,
    data_key,
    data_label,
    data_sets,
    group_value,
    is_quality_metric,
    jpeg_curve,
    load_reference,
    lower_is_better,
    make_curve,
    metric_label,
    metric_unit,
    normalize_metric_name,
    pareto_front,
    parse_group_by,
    replicate_curves,
    shared_metrics,
)
from taskcodec.compare.images import ImageBootstrapRow, image_bootstrap, read_per_image
from taskcodec.compare.report import (
    format_bd,
    format_curves,
    markdown_bd,
    plot_rd,
    points_records,
    safe_name,
    write_bd,
    write_outputs,
    write_points,
    write_rows,
)
from taskcodec.compare.selection import MAX_RUNS, MAX_TAG_CHARS, run_ids_tag, select_runs, tag_filter
from taskcodec.compare.statistics import (
    Estimate,
    PairedRow,
    estimate,
    mean_interval,
    paired_table,
    tost_p,
)

__all__ = [
    "BD_METHODS", "JPEG_CURVE", "MAX_RUNS", "MAX_TAG_CHARS", "MIN_BD_POINTS", "RATE", "BDRow",
    "CompareOptions", "Comparison", "Curve", "Point", "_check_method", "bd_metric", "bd_rate",
    "bd_table", "build_curves", "check_rate", "choose_metrics", "compare", "curves_from_runs",
    "data_key", "data_label", "data_sets", "format_bd", "format_curves", "group_value",
    "is_quality_metric", "jpeg_curve", "load_reference", "lower_is_better", "make_curve",
    "markdown_bd", "metric_label", "metric_unit", "normalize_metric_name", "overlap",
    "parse_group_by", "pick_anchor", "plot_rd", "points_records", "run_ids_tag", "safe_name",
    "select_runs", "shared_metrics", "tag_filter", "write_bd", "write_outputs", "write_points",
    "write_rows", "aggregate_replicates", "pareto_front", "replicate_curves", "Estimate",
    "PairedRow", "estimate", "mean_interval", "paired_table", "tost_p", "ANCHOR_CURVES",
    "anchor_curve", "anchor_curves", "ImageBootstrapRow", "image_bootstrap", "read_per_image",
]
