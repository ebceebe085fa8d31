"""What a comparison shows: RD plots, points and BD tables as CSV/JSON, terminal and Markdown
tables."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskcodec.compare.bd import BDRow
from taskcodec.compare.curves import _LABELS, RATE, Curve, Point, metric_label, metric_unit
from taskcodec.compare.images import FIELDS as IMAGE_BOOTSTRAP_FIELDS
from taskcodec.compare.images import GENERATOR, ImageBootstrapRow
from taskcodec.compare.statistics import PairedRow

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


# -- files ------------------------------------------------------------------------------------
def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def _error_bars(points: Sequence[Curve], key: str, centres: Sequence[float]):
    """Distances from each point down and up to its interval (0 without one), for errorbar."""
    below, above = [], []
    for p, c in zip(points, centres, strict=True):
        low, high = p.ci.get(key, (c, c))
        below.append(c - low if math.isfinite(low) else 0.0)
        above.append(high - c if math.isfinite(high) else 0.0)
    return [below, above]


def plot_rd(curves: Sequence[Curve], metric: str, stem: Path, rate: str = RATE) -> list[Path]:
    """RD plot of ``metric`` against bpp: one line per curve, a marker per point (labelled with
    its λ for run curves), references dashed. Writes ``stem``.png and ``stem``.svg."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for i, curve in enumerate(curves):
        pts = [p for p in curve.points if metric in p.metrics]
        if not pts:
            continue
        xs, ys = [p.bpp for p in pts], [p.metrics[metric] for p in pts]
        replicated = any(p.n > 1 for p in pts)
        ax.errorbar(xs, ys, xerr=_error_bars(pts, "rate", xs) if replicated else None,
                    yerr=_error_bars(pts, metric, ys) if replicated else None,
                    marker=_MARKERS[i % len(_MARKERS)], markersize=5, capsize=3,
                    linestyle="-" if curve.source == "runs" else "--",
                    label=f"{curve.name} ({len(pts)}"
                          + (f", mean of {max(p.n for p in pts)} ± 95 % CI)" if replicated
                             else ")"))
        if curve.source == "runs" and len(pts) <= 8:
            for p, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, alpha=0.7)
    ax.margins(x=0.08)  # room for the λ labels right of the last point
    ax.set_xlabel("Rate (bpp, bits per pixel)" if rate == RATE else f"Rate ({rate}, bits per pixel)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{_LABELS.get(metric.lower(), metric)} vs rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title="curve (points)", title_fontsize="small")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]
    fig.savefig(paths[0], dpi=110)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable, editable
        fig.savefig(paths[1])
    return paths


def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _ci_columns(p: Point, rate: str) -> dict[str, float]:
    return {f"{rate if k == 'rate' else k}_ci_{end}": v for k, (low, high) in p.ci.items()
            for end, v in (("low", low), ("high", high))}


def points_records(curves: Sequence[Curve], rate: str = RATE) -> list[dict[str, Any]]:
    return [{"curve": c.name, "source": c.source, "run_id": p.run_id, "label": p.label,
             "replicates": p.n, rate: p.bpp, **p.metrics, **_ci_columns(p, rate)}
            for c in curves for p in c.points]


def write_points(curves: Sequence[Curve], folder: Path, rate: str = RATE) -> list[Path]:
    """points.csv (one row per point, one column per metric) and points.json (by curve); the
    rate column is named after the rate compared (``bpp`` unless ``--rate``)."""
    metrics = sorted({m for c in curves for p in c.points for m in p.metrics})
    intervals = sorted({k for c in curves for p in c.points for k in _ci_columns(p, rate)})
    fields = ["curve", "source", "run_id", "label", "replicates", rate, *metrics, *intervals]
    csv_path, json_path = folder / "points.csv", folder / "points.json"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(points_records(curves, rate))
    doc = {"rate": rate, "curves": [
        {"name": c.name, "source": c.source,
         "points": [{"run_id": p.run_id, "label": p.label, "bpp": p.bpp,
                     "metrics": {k: _json_number(v) for k, v in p.metrics.items()},
                     "replicates": p.n,
                     "ci95": {k: [_json_number(low), _json_number(high)]
                              for k, (low, high) in p.ci.items()}}
                    for p in c.points]} for c in curves]}
    json_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return [csv_path, json_path]


def write_rows(rows: Sequence[Any], fields: list[str], stem: Path,
                doc: dict[str, Any]) -> list[Path]:
    """``stem``.csv (one line per row, None as blank) and ``stem``.json (``doc`` + rows)."""
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    records = [{f: getattr(r, f) for f in fields} for r in rows]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in rec.items()} for rec in records)
    doc = {**doc, "rows": [{k: _json_number(v) if isinstance(v, float) else v
                            for k, v in rec.items()} for rec in records]}
    json_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return [csv_path, json_path]


def write_bd(rows: Sequence[BDRow], folder: Path, *, anchor: str, method: str) -> list[Path]:
    """bd.csv and bd.json: BD-rate (%) and BD-metric of every curve against the anchor."""
    fields = ["curve", "anchor", "metric", "bd_rate", "bd_metric", "rate_overlap",
              "quality_overlap", "bd_rate_error", "bd_metric_error", "dropped"]
    return write_rows(rows, fields, folder / "bd",
                       {"anchor": anchor, "method": method, "bd_rate_unit": "%"})


# -- terminal ---------------------------------------------------------------------------------
def format_curves(curves: Sequence[Curve], metrics: Sequence[str]) -> str:
    width = max([len(c.name) for c in curves] + [5]) + 2
    head = f"{'curve':<{width}}{'points':>7}  {'bpp':>15}" + "".join(f"  {m:>17}" for m in metrics)
    lines = [head, "-" * len(head)]
    for c in curves:
        rates = [p.bpp for p in c.points]
        cells = [f"{min(rates):.3f}-{max(rates):.3f}"]
        for m in metrics:
            _, values = c.series(m)
            cells.append(f"{min(values):.4g}-{max(values):.4g}" if values else "-")
        lines.append(f"{c.name:<{width}}{len(c.points):>7}  {cells[0]:>15}"
                     + "".join(f"  {cell:>17}" for cell in cells[1:]))
    return "\n".join(lines)


def format_bd(rows: Sequence[BDRow], anchor: str, method: str) -> str:
    if not rows:
        return f"BD against {anchor!r}: no other curve to compare with"
    width = max([len(r.curve) for r in rows] + [5]) + 2
    mwidth = max([len(r.metric) for r in rows] + [6]) + 2
    head = f"{'curve':<{width}}{'metric':<{mwidth}}{'BD-rate':>10}{'BD-metric':>12}"
    lines = [f"BD against anchor {anchor!r} ({method}); negative BD-rate = fewer bits", head,
             "-" * len(head)]
    for r in rows:
        rate = f"{r.bd_rate:+.2f} %" if r.bd_rate is not None else "n/a"
        unit = metric_unit(r.metric)
        value = (f"{r.bd_metric:+.4g}{' ' + unit if unit else ''}" if r.bd_metric is not None
                 else "n/a")
        line = f"{r.curve:<{width}}{r.metric:<{mwidth}}{rate:>10}{value:>12}"
        if r.reason:
            line += f"   ({r.reason})"
        if r.dropped:
            line += f"   [Pareto front dropped {r.dropped}]"
        lines.append(line)
    return "\n".join(lines)


def markdown_bd(rows: Sequence[BDRow], anchor: str, method: str) -> str:
    """The BD table as Markdown, shown as the comparison run's description in the MLflow UI."""
    lines = [f"**RD comparison** against `{anchor}` ({method} interpolation)", "",
             "| curve | metric | BD-rate | BD-metric | note |", "|---|---|---:|---:|---|"]
    for r in rows:
        rate = f"{r.bd_rate:+.2f} %" if r.bd_rate is not None else "n/a"
        value = f"{r.bd_metric:+.4g}" if r.bd_metric is not None else "n/a"
        note = "; ".join(n for n in (r.reason, r.dropped and f"Pareto dropped {r.dropped}") if n)
        lines.append(f"| {r.curve} | {r.metric} | {rate} | {value} | {note} |")
    return "\n".join(lines)


def write_outputs(curves: Sequence[Curve], metrics: Sequence[str], rows: Sequence[BDRow],
                  folder: Path, *, anchor: str, method: str, run_ids: Sequence[str],
                  rate: str = RATE, ratios: Sequence[Any] = ()) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for metric in metrics:
        files += plot_rd(curves, metric, folder / f"rd_{safe_name(metric)}", rate)
    files += write_points(curves, folder, rate)
    files += write_bd(rows, folder, anchor=anchor, method=method)
    if ratios:
        from taskcodec.ideal_gain import write_ratios

        files += write_ratios(ratios, folder)
    runs_path = folder / "compared_runs.json"
    runs_path.write_text(json.dumps({"run_ids": list(run_ids)}, indent=2) + "\n")
    files.append(runs_path)
    return files




# -- paired replicates ---------------------------------------------------------------------------
PAIRED_FIELDS = ["curve", "anchor", "metric", "quantity", "unit", "seeds", "mean", "sd", "t_low",
                 "t_high", "boot_low", "boot_high", "effect_size", "p_value", "tost_p",
                 "per_seed", "error"]
_QUANTITY = {"bd_rate": "BD-rate", "bd_metric": "BD-metric", "delta_j": "ΔJ"}


def _g(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.{digits}g}"


def paired_cells(r: PairedRow) -> list[str]:
    """What one paired row says: quantity, mean ± sd, intervals, effect size, tests."""
    tost = f"{r.tost_p:.3g}" if r.tost_p is not None and math.isfinite(r.tost_p) else "-"
    p = f"{r.p_value:.3g}" if r.p_value is not None and math.isfinite(r.p_value) else "n/a"
    sd = "n/a" if r.sd is None or not math.isfinite(r.sd) else f"{r.sd:.3g}"
    return [f"{_QUANTITY[r.quantity]} ({r.unit})" if r.unit else _QUANTITY[r.quantity],
            str(r.seeds), _g(r.mean), sd, f"[{_g(r.t_low)}, {_g(r.t_high)}]",
            f"[{_g(r.boot_low)}, {_g(r.boot_high)}]", _g(r.effect_size, 3), p, tost]


_PAIRED_HEAD = ["quantity", "seeds", "mean", "sd", "95 % t-interval", "bootstrap", "d_z", "p",
                "TOST p"]


def format_paired(rows: Sequence[PairedRow], pair_by: str) -> str:
    if not rows:
        return f"Paired by {pair_by}: no curve to pair with the anchor"
    lines = [f"Paired by {pair_by}: each {pair_by} against the same {pair_by}'s anchor "
             f"{rows[0].anchor!r} (negative BD-rate / ΔJ = fewer bits)"]
    for r in rows:
        cells = paired_cells(r)
        text = (f"  {r.curve} / {r.metric}: {cells[0]} = {cells[2]} (sd {cells[3]}, n={cells[1]}) "
                f"t {cells[4]} boot {cells[5]} d_z {cells[6]} p {cells[7]}")
        if r.tost_p is not None:
            text += f" TOST p {cells[8]}"
        lines.append(text + (f"   ({r.error})" if r.error else ""))
    return "\n".join(lines)


def markdown_paired(rows: Sequence[PairedRow], pair_by: str) -> str:
    lines = [f"**Paired by {pair_by}** (each against the same {pair_by}'s anchor)", "",
             "| curve | metric | " + " | ".join(_PAIRED_HEAD) + " | note |",
             "|---|---|" + "---:|" * len(_PAIRED_HEAD) + "---|"]
    for r in rows:
        lines.append(f"| {r.curve} | {r.metric} | " + " | ".join(paired_cells(r))
                     + f" | {r.error} |")
    return "\n".join(lines)


def write_paired(rows: Sequence[PairedRow], folder: Path, *, pair_by: str, method: str,
                 confidence: float, margin: float | None) -> list[Path]:
    """paired.csv and paired.json: per-seed deltas against the same seed's anchor, estimated."""
    return write_rows(rows, PAIRED_FIELDS, folder / "paired",
                      {"pair_by": pair_by, "method": method, "confidence": confidence,
                       "equivalence_margin": margin, "bd_rate_unit": "%", "delta_j_unit": "bpp"})


# -- bootstrap over images -----------------------------------------------------------------------
def _interval_text(value: float | None, low: float | None, high: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    unit = f" {unit}" if unit else ""
    return f"{_g(value)}{unit} [{_g(low)}, {_g(high)}]"


def image_bootstrap_cells(r: ImageBootstrapRow) -> list[str]:
    """BD-rate and BD-metric with their intervals, and the resamples left out of each."""
    failed = (f"{r.bd_rate_failed}/{r.bd_metric_failed}"
              if r.bd_rate_failed or r.bd_metric_failed else "0")
    return [str(r.images), _interval_text(r.bd_rate, r.bd_rate_low, r.bd_rate_high, "%"),
            _interval_text(r.bd_metric, r.bd_metric_low, r.bd_metric_high,
                           metric_unit(r.metric)), failed]


def _image_bootstrap_title(rows: Sequence[ImageBootstrapRow]) -> str:
    r = rows[0]
    return (f"Bootstrap over images against {r.anchor!r}: {r.resamples} resamples of the "
            f"images ({GENERATOR}, seed {r.seed}), {100 * r.confidence:g} % percentile "
            "intervals; failed = resamples without a BD value (BD-rate/BD-metric), left out")


def format_image_bootstrap(rows: Sequence[ImageBootstrapRow]) -> str:
    if not rows:
        return "Bootstrap over images: no run curve to compare with the anchor"
    lines = [_image_bootstrap_title(rows)]
    for r in rows:
        images, rate, value, failed = image_bootstrap_cells(r)
        lines.append(f"  {r.curve} / {r.metric}: BD-rate {rate}; BD-metric {value}; "
                     f"{images} images, failed {failed}" + (f"   ({r.error})" if r.error else ""))
    return "\n".join(lines)


def markdown_image_bootstrap(rows: Sequence[ImageBootstrapRow]) -> str:
    if not rows:
        return ""
    lines = [f"**{_image_bootstrap_title(rows)}**", "",
             "| curve | metric | images | BD-rate [interval] | BD-metric [interval] | failed "
             "| note |", "|---|---|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r.curve} | {r.metric} | " + " | ".join(image_bootstrap_cells(r))
                     + f" | {r.error} |")
    return "\n".join(lines)


def write_image_bootstrap(rows: Sequence[ImageBootstrapRow], folder: Path, *,
                          method: str) -> list[Path]:
    """image_bootstrap.csv and .json: BD on all images and its percentile intervals."""
    first = rows[0] if rows else None
    return write_rows(rows, IMAGE_BOOTSTRAP_FIELDS, folder / "image_bootstrap",
                      {"method": method, "interval": "percentile", "generator": GENERATOR,
                       "resamples": first.resamples if first else 0,
                       "seed": first.seed if first else 0,
                       "confidence": first.confidence if first else None,
                       "bd_rate_unit": "%"})
