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

Published points (a CompressAI results JSON, a CSV of bpp and metrics) and the JPEG points that
evaluate measured next to each run join as reference curves. The result is a set of files
(RD plots as PNG and SVG, points and BD table as CSV and JSON) logged as artifacts of a new
MLflow run tagged ``comparison=true``.

When the curves hold paper 1's baselines, every other curve of their group also gets paper 1's
share of the ideal gain (:mod:`taskcodec.ideal_gain`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskcodec.config import higher_is_better
from taskcodec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RATE = "bpp"
BD_METHODS = ("pchip", "cubic")
MIN_BD_POINTS = 4  # a cubic through fewer points is not determined (VCEG-M33 uses four)
JPEG_CURVE = "JPEG (Pillow)"
# Older MLflow servers refuse tag values over 5000 characters (8000 since 2.x): stay below both.
MAX_TAG_CHARS = 5000
MAX_RUNS = 10_000

# Logged next to the quality metrics but not quality: rates, timings, training values, JPEG.
_NOT_QUALITY_PREFIXES = ("bpp", "jpeg_", "val_", "train_", "bd_", "system/")
_NOT_QUALITY_SUFFIXES = ("_time", "_seconds", "loss", "_bytes")
_NOT_QUALITY = frozenset({"epoch", "step", "lr", "aux_lr", "images", "rate"})
_LABELS = {"psnr": "PSNR", "ms_ssim": "MS-SSIM", "map": "mAP", "miou": "mIoU",
           "abs_rel": "AbsRel", "rmse": "RMSE", "accuracy": "Accuracy",
           "top1": "Top-1 accuracy", "top5": "Top-5 accuracy"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def is_quality_metric(name: str) -> bool:
    """Whether a logged metric measures quality (and can be a curve's y axis)."""
    key = name.lower()
    return not (key in _NOT_QUALITY or key.startswith(_NOT_QUALITY_PREFIXES)
                or key.endswith(_NOT_QUALITY_SUFFIXES))


def lower_is_better(name: str) -> bool:
    return not higher_is_better(name)


def metric_label(name: str) -> str:
    """Axis label with unit, and the direction when smaller is better."""
    label = _LABELS.get(name.lower(), name)
    if metric_unit(name):
        label += f" ({metric_unit(name)})"
    return f"{label}, lower is better" if lower_is_better(name) else label


def metric_unit(name: str) -> str:
    return "dB" if name.lower().startswith("psnr") else ""


# -- curves -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One rate–quality point: an evaluate run, or one row of a published result."""

    bpp: float
    metrics: Mapping[str, float]
    run_id: str = ""
    label: str = ""  # what tells the points of a curve apart, e.g. "λ=0.0067"


@dataclass(frozen=True)
class Curve:
    name: str
    points: tuple[Point, ...]
    source: str = "runs"  # runs | reference | jpeg

    def metric_names(self) -> set[str]:
        """Quality metrics of at least one point."""
        return {m for p in self.points for m in p.metrics if is_quality_metric(m)}

    def series(self, metric: str) -> tuple[list[float], list[float]]:
        """(rates, values) of the points that have ``metric``, in rate order."""
        pts = [(p.bpp, p.metrics[metric]) for p in self.points if metric in p.metrics]
        return [r for r, _ in pts], [v for _, v in pts]


def make_curve(name: str, points: Iterable[Point], source: str = "runs") -> Curve:
    """A curve with its points ordered by rate (ties by run id, so the order is stable)."""
    return Curve(name, tuple(sorted(points, key=lambda p: (p.bpp, p.run_id, p.label))), source)


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[k] = v
    return out


def group_value(run, keys: Sequence[str]) -> str:
    """The curve a run belongs to: the run's tag, else its param, for each key (joined by /)."""
    parts = []
    for key in keys:
        value = run.data.tags.get(key, run.data.params.get(key))
        parts.append(value if value not in (None, "") else f"(no {key})")
    return "/".join(parts)


def _point_label(run) -> str:
    lmbda = run.data.params.get("lmbda")
    if lmbda not in (None, "", "None"):
        return f"λ={lmbda}"
    alpha = run.data.tags.get("alpha") or run.data.params.get("alpha")  # scalable: 1/lambda
    if alpha not in (None, "", "None"):
        try:
            return f"α={float(alpha):g}"
        except ValueError:
            return f"α={alpha}"
    return run.info.run_name or run.info.run_id[:8]


def parse_group_by(group_by: str) -> list[str]:
    keys = [k.strip() for k in group_by.split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"--group-by {group_by!r} names no tag or param")
    return keys


def check_rate(rate: str) -> None:
    if not re.fullmatch(r"bpp[A-Za-z0-9_]*", rate):
        raise ConfigError(f"--rate {rate!r} is not a rate metric (bpp, bpp_enh, bpp_base, "
                          "bpp_estimated, bpp_enh_estimated, ...)")


def data_key(run) -> str:
    """The data set a run was evaluated on: its content digest ("" for runs that predate it)."""
    return run.data.tags.get("data_digest") or run.data.params.get("data_digest") or ""


def data_label(run) -> str:
    """How a curve names its data set: ``kodak#1a2b3c4d``."""
    digest = data_key(run)
    if not digest:
        return "unknown data"
    return f"{run.data.tags.get('data_name') or 'data'}#{digest[:8]}"


def data_sets(runs: Iterable) -> list[str]:
    """The labels of the data sets the runs were evaluated on, sorted."""
    return sorted({data_label(r) for r in runs})


def curves_from_runs(runs: Iterable, group_by: str = "method", rate: str = RATE, *,
                     mix_data: bool = False) -> list[Curve]:
    """One curve per value of ``group_by`` (a tag or param, or several joined by commas), with
    the logged metric ``rate`` as each point's rate.

    Runs evaluated on different data (by content digest) never share a curve: when the runs
    span several data sets each curve name ends in `` @ DATA``, unless ``mix_data``.
    """
    check_rate(rate)
    keys = parse_group_by(group_by)
    runs = list(runs)
    split_data = not mix_data and len(data_sets(runs)) > 1
    groups: dict[str, list[Point]] = {}
    for run in runs:
        metrics = _finite(run.data.metrics)
        if rate not in metrics:
            log.debug("run %s has no finite %s; left out", run.info.run_id, rate)
            continue
        bpp = metrics.pop(rate)
        quality = {k: v for k, v in metrics.items() if is_quality_metric(k)}
        name = group_value(run, keys) + (f" @ {data_label(run)}" if split_data else "")
        groups.setdefault(name, []).append(
            Point(bpp, quality, run.info.run_id, _point_label(run)))
    return [make_curve(name, pts) for name, pts in sorted(groups.items())]


def jpeg_curve(runs: Iterable) -> Curve | None:
    """JPEG at the rate of each run (the ``jpeg_*`` metrics evaluate logs), as one curve.

    Runs whose rates led evaluate to the same JPEG setting measured the same point; it is kept
    once (averaged), since a curve cannot hold two points at one rate.
    """
    by_rate: dict[float, list[tuple[str, dict[str, float]]]] = {}
    for run in runs:
        metrics = _finite(run.data.metrics)
        if "jpeg_bpp" not in metrics:
            continue
        quality = {k[len("jpeg_"):]: v for k, v in metrics.items()
                   if k.startswith("jpeg_") and k != "jpeg_bpp"}
        by_rate.setdefault(metrics["jpeg_bpp"], []).append((run.info.run_id, quality))
    points = []
    for bpp, measured in by_rate.items():
        names = set.intersection(*(set(q) for _, q in measured))
        quality = {k: sum(q[k] for _, q in measured) / len(measured) for k in names}
        label = "JPEG" if len(measured) == 1 else f"JPEG ({len(measured)} runs)"
        points.append(Point(bpp, quality, min(r for r, _ in measured), label))
    return make_curve(JPEG_CURVE, points, "jpeg") if points else None


def shared_metrics(curves: Sequence[Curve]) -> list[str]:
    """Quality metrics every point of every run curve has (references need not have them all)."""
    own = [c for c in curves if c.source == "runs"] or list(curves)
    sets = [set(p.metrics) for c in own for p in c.points]
    common = set.intersection(*sets) if sets else set()
    # psnr and ms_ssim first: the metrics everybody looks for, then the task metrics.
    return sorted((m for m in common if is_quality_metric(m)),
                  key=lambda m: (m not in ("psnr", "ms_ssim"), m != "psnr", m))


# -- published reference points ---------------------------------------------------------------
def normalize_metric_name(name: str) -> str:
    """CompressAI's ``psnr-rgb`` / ``ms-ssim-rgb`` are our ``psnr`` / ``ms_ssim``."""
    key = name.strip().lower()
    for suffix in ("-rgb", "_rgb"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return re.sub(r"[-\s]+", "_", key)


def _number(value: Any, where: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a number") from None
    return number if math.isfinite(number) else None


def _reference_points(columns: Mapping[str, Sequence[Any]], path: Path) -> list[Point]:
    if RATE not in columns:
        raise DataError(f"reference {path} has no {RATE} column (has: {', '.join(columns) or 'none'})")
    rates = columns[RATE]
    points = []
    for i, raw in enumerate(rates):
        bpp = _number(raw, f"{path}: {RATE}[{i}]")
        if bpp is None or bpp <= 0:
            continue
        metrics = {}
        for name, values in columns.items():
            if name == RATE or not is_quality_metric(name):
                continue
            value = _number(values[i], f"{path}: {name}[{i}]")
            if value is not None:
                metrics[name] = value
        points.append(Point(bpp, metrics, label=f"{bpp:.3g} bpp"))
    if not points:
        raise DataError(f"reference {path} holds no positive {RATE} value")
    return points


def _load_reference_json(path: Path) -> tuple[str, dict[str, list]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"reference {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"reference {path} is not a JSON object with a 'results' member")
    results = data.get("results", data)
    if not isinstance(results, dict):
        raise DataError(f"reference {path}: 'results' is not an object of lists")
    columns: dict[str, list] = {}
    for key, values in results.items():
        if isinstance(values, list):
            columns[normalize_metric_name(key)] = values
    lengths = {k: len(v) for k, v in columns.items()}
    if RATE in lengths and any(n != lengths[RATE] for n in lengths.values()):
        raise DataError(f"reference {path}: lists of different lengths "
                        f"({', '.join(f'{k}={n}' for k, n in lengths.items())})")
    name = data.get("name") if isinstance(data.get("name"), str) else ""
    return name or path.stem, columns


def _load_reference_csv(path: Path) -> tuple[str, dict[str, list]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"reference {path} is empty (expected a header with {RATE})")
        names = {f: normalize_metric_name(f) for f in reader.fieldnames}
        columns: dict[str, list] = {n: [] for n in names.values()}
        for row in reader:
            for raw, name in names.items():
                columns[name].append(row.get(raw))
    return path.stem, columns


def load_reference(path: Path | str) -> Curve:
    """Published RD points as a curve: a CompressAI results JSON or a CSV with a bpp column.

    The JSON layout is CompressAI's (``{"name": ..., "results": {"bpp": [...],
    "psnr-rgb": [...], "ms-ssim-rgb": [...]}}``); metric names are mapped to ours
    (``psnr-rgb`` -> ``psnr``). The curve is named by the JSON's ``name``, else the file name.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference file {path} does not exist")
    loader = _load_reference_json if path.suffix.lower() == ".json" else _load_reference_csv
    if path.suffix.lower() not in (".json", ".csv"):
        raise DataError(f"reference {path}: expected a .json (CompressAI results) or .csv file")
    try:
        name, columns = loader(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read reference {path}: {err}") from None
    return make_curve(name, _reference_points(columns, path), "reference")


# -- Bjøntegaard deltas -----------------------------------------------------------------------
def _rd_arrays(curve: Curve, metric: str):
    """Rates and quality (negated when lower is better, so quality always rises with rate)."""
    import numpy as np

    rates, values = curve.series(metric)
    if len(rates) < MIN_BD_POINTS:
        raise ConfigError(f"curve {curve.name!r} has {len(rates)} {metric} point(s); "
                          f"BD needs at least {MIN_BD_POINTS}")
    sign = -1.0 if lower_is_better(metric) else 1.0
    return np.asarray(rates, dtype=float), sign * np.asarray(values, dtype=float)


def _require_distinct_rates(curve: Curve, rates) -> None:
    import numpy as np

    if np.any(np.diff(rates) <= 0):
        raise ConfigError(f"curve {curve.name!r} has two points at the same rate; "
                          "BD needs distinct rates")


def _require_rising(curve: Curve, metric: str, rates, quality) -> None:
    import numpy as np

    _require_distinct_rates(curve, rates)
    drops = np.nonzero(np.diff(quality) <= 0)[0]
    if drops.size:
        i = int(drops[0])
        sign = -1.0 if lower_is_better(metric) else 1.0
        raise ConfigError(f"curve {curve.name!r}: {metric} does not improve from "
                          f"{rates[i]:.4g} to {rates[i + 1]:.4g} bpp ({sign * quality[i]:.4g} -> "
                          f"{sign * quality[i + 1]:.4g}); BD-rate needs quality that improves "
                          "with rate")


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of the joint range of ``a`` and ``b`` that both cover (0: disjoint, 1: equal)."""
    low, high = max(min(a), min(b)), min(max(a), max(b))
    span = max(max(a), max(b)) - min(min(a), min(b))
    return max(high - low, 0.0) / span if span > 0 else 1.0


def _require_overlap(anchor: Curve, test: Curve, what: str, a, b, unit: str = "") -> None:
    if overlap(a, b) <= 0:
        raise ConfigError(
            f"curves {test.name!r} ({min(b):.4g}-{max(b):.4g}{unit}) and {anchor.name!r} "
            f"({min(a):.4g}-{max(a):.4g}{unit}) do not overlap in {what}; BD needs a common range")


def _check_method(method: str) -> None:
    if method not in BD_METHODS:
        raise ConfigError(f"BD method {method!r} is not one of: {', '.join(BD_METHODS)}")


def bd_rate(anchor: Curve, test: Curve, metric: str = "psnr", method: str = "pchip") -> float:
    """Average rate difference of ``test`` against ``anchor`` at equal ``metric``, in %.

    Negative is better: -50 means half the bits for the same quality.
    """
    import bjontegaard

    _check_method(method)
    ra, qa = _rd_arrays(anchor, metric)
    rt, qt = _rd_arrays(test, metric)
    _require_rising(anchor, metric, ra, qa)
    _require_rising(test, metric, rt, qt)
    sign = -1.0 if lower_is_better(metric) else 1.0
    _require_overlap(anchor, test, metric, sign * qa, sign * qt, f" {metric_unit(metric)}".rstrip())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the overlap is reported in the table instead
        return float(bjontegaard.bd_rate(ra, qa, rt, qt, method=method,
                                         require_matching_points=False, min_overlap=0))


def bd_metric(anchor: Curve, test: Curve, metric: str = "psnr", method: str = "pchip") -> float:
    """Average ``metric`` difference of ``test`` against ``anchor`` at equal rate (BD-PSNR for
    PSNR), in the metric's unit. Positive is better, except for lower-is-better metrics."""
    import bjontegaard

    _check_method(method)
    ra, qa = _rd_arrays(anchor, metric)
    rt, qt = _rd_arrays(test, metric)
    _require_distinct_rates(anchor, ra)
    _require_distinct_rates(test, rt)
    _require_overlap(anchor, test, "rate", ra, rt, " bpp")
    sign = -1.0 if lower_is_better(metric) else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sign * float(bjontegaard.bd_psnr(ra, qa, rt, qt, method=method,
                                                require_matching_points=False, min_overlap=0))


@dataclass
class BDRow:
    """One line of the BD table; a value that cannot be computed is None with the reason."""

    curve: str
    anchor: str
    metric: str
    bd_rate: float | None = None
    bd_metric: float | None = None
    rate_overlap: float | None = None  # share of the joint rate range both curves cover
    quality_overlap: float | None = None
    bd_rate_error: str = ""
    bd_metric_error: str = ""

    @property
    def reason(self) -> str:
        return self.bd_rate_error or self.bd_metric_error


def bd_table(curves: Sequence[Curve], anchor: Curve, metrics: Sequence[str],
             method: str = "pchip") -> list[BDRow]:
    """BD-rate and BD-metric of every curve but the anchor, for every metric."""
    _check_method(method)
    rows = []
    for metric in metrics:
        ar, aq = anchor.series(metric)
        for curve in curves:
            if curve.name == anchor.name:
                continue
            row = BDRow(curve.name, anchor.name, metric)
            tr, tq = curve.series(metric)
            if ar and tr:
                row.rate_overlap, row.quality_overlap = overlap(ar, tr), overlap(aq, tq)
            try:
                row.bd_rate = bd_rate(anchor, curve, metric, method)
            except ConfigError as err:
                row.bd_rate_error = str(err)
            try:
                row.bd_metric = bd_metric(anchor, curve, metric, method)
            except ConfigError as err:
                row.bd_metric_error = str(err)
            rows.append(row)
    return rows


def pick_anchor(curves: Sequence[Curve], anchor: str | None) -> Curve:
    """The named curve (exact, else case-insensitive, else a unique prefix such as "jpeg");
    by default the first reference curve, else JPEG, else the first curve in name order."""
    if not curves:
        raise ConfigError("nothing to compare: no curves")
    if anchor:
        key = anchor.lower()
        for match in (lambda c: c.name == anchor, lambda c: c.name.lower() == key,
                      lambda c: c.name.lower().startswith(key)):
            found = [c for c in curves if match(c)]
            if len(found) == 1:
                return found[0]
        raise ConfigError(f"--anchor {anchor!r} is not one of the curves: "
                          f"{', '.join(repr(c.name) for c in curves)}")
    for source in ("reference", "jpeg", "runs"):
        for curve in curves:
            if curve.source == source:
                return curve
    return curves[0]


# -- files ------------------------------------------------------------------------------------
def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


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
        ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], markersize=5,
                linestyle="-" if curve.source == "runs" else "--",
                label=f"{curve.name} ({len(pts)})")
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


def points_records(curves: Sequence[Curve], rate: str = RATE) -> list[dict[str, Any]]:
    return [{"curve": c.name, "source": c.source, "run_id": p.run_id, "label": p.label,
             rate: p.bpp, **p.metrics} for c in curves for p in c.points]


def write_points(curves: Sequence[Curve], folder: Path, rate: str = RATE) -> list[Path]:
    """points.csv (one row per point, one column per metric) and points.json (by curve); the
    rate column is named after the rate compared (``bpp`` unless ``--rate``)."""
    metrics = sorted({m for c in curves for p in c.points for m in p.metrics})
    fields = ["curve", "source", "run_id", "label", rate, *metrics]
    csv_path, json_path = folder / "points.csv", folder / "points.json"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(points_records(curves, rate))
    doc = {"rate": rate, "curves": [
        {"name": c.name, "source": c.source,
         "points": [{"run_id": p.run_id, "label": p.label, "bpp": p.bpp,
                     "metrics": {k: _json_number(v) for k, v in p.metrics.items()}}
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
              "quality_overlap", "bd_rate_error", "bd_metric_error"]
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
        lines.append(line)
    return "\n".join(lines)


def markdown_bd(rows: Sequence[BDRow], anchor: str, method: str) -> str:
    """The BD table as Markdown, shown as the comparison run's description in the MLflow UI."""
    lines = [f"**RD comparison** against `{anchor}` ({method} interpolation)", "",
             "| curve | metric | BD-rate | BD-metric | note |", "|---|---|---:|---:|---|"]
    for r in rows:
        rate = f"{r.bd_rate:+.2f} %" if r.bd_rate is not None else "n/a"
        value = f"{r.bd_metric:+.4g}" if r.bd_metric is not None else "n/a"
        lines.append(f"| {r.curve} | {r.metric} | {rate} | {value} | {r.reason} |")
    return "\n".join(lines)


# -- selecting runs ---------------------------------------------------------------------------
def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"tag value {value!r} holds both quote characters; use --filter instead")


def tag_filter(tags: Mapping[str, str]) -> str:
    """MLflow search clauses for exact tag values (keys in backticks, so any key is allowed)."""
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


def _join(*clauses: str) -> str:
    return " and ".join(c for c in clauses if c.strip())


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                      page_token=token)
        except Exception as err:  # MlflowException for a bad filter, network errors
            raise ConfigError(f"MLflow search {filter_string!r} failed: "
                              f"{str(err).splitlines()[0][:300]}") from None
        runs.extend(page)
        token = page.token
        if not token or len(runs) >= MAX_RUNS:
            return runs


def select_runs(client, *, experiment_ids: Sequence[str] = (), filter_string: str = "",
                run_ids: Sequence[str] = (), tags: Mapping[str, str] | None = None) -> list:
    """The runs to compare, without earlier comparison runs.

    Explicit ``run_ids`` win; otherwise the experiments are searched with ``filter_string`` and
    the tag conditions. Unless the filter already speaks of ``entry_point``, evaluate runs are
    taken when there are any (training runs log validation metrics, not real-bitstream bpp).
    """
    tags = dict(tags or {})
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                run = client.get_run(run_id)
            except Exception as err:
                raise ConfigError(f"no MLflow run {run_id!r} at {client.tracking_uri}: "
                                  f"{str(err).splitlines()[0][:200]}") from None
            if all(run.data.tags.get(k) == v for k, v in tags.items()):
                runs.append(run)
    else:
        base = _join(filter_string, tag_filter(tags))
        runs = []
        if "entry_point" not in filter_string:
            runs = _search(client, list(experiment_ids),
                           _join(base, "tags.entry_point = 'evaluate'"))
        if not runs:
            runs = _search(client, list(experiment_ids), base)
    return [r for r in runs if r.data.tags.get("comparison") != "true"]


def run_ids_tag(run_ids: Sequence[str], limit: int = MAX_TAG_CHARS) -> str:
    """Comma list of run ids that fits a tag; when cut, it ends with how many were left out."""
    text = ",".join(run_ids)
    if len(text) <= limit:
        return text

    def cut(kept: list[str]) -> str:
        return ",".join([*kept, f"...(+{len(run_ids) - len(kept)} more; see compared_runs.json)"])

    kept: list[str] = []
    for run_id in run_ids:
        if len(cut([*kept, run_id])) > limit:
            break
        kept.append(run_id)
    return cut(kept)


# -- the whole comparison ---------------------------------------------------------------------
@dataclass
class CompareOptions:
    """What ``taskcodec compare`` was asked for (see its --help)."""

    experiment: str = ""  # default: $MLFLOW_EXPERIMENT_NAME or "taskcodec"
    filter_string: str = ""
    run_ids: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    group_by: str = "method"
    anchor: str = ""
    metrics: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    jpeg: bool = False
    mix_data: bool = False  # put runs evaluated on different data into one curve
    bd_method: str = "pchip"
    rate: str = RATE
    output_dir: Path | None = None
    run_name: str = ""

    def __post_init__(self) -> None:
        _check_method(self.bd_method)
        parse_group_by(self.group_by)
        check_rate(self.rate)


@dataclass
class Comparison:
    run_id: str
    experiment_id: str
    curves: list[Curve]
    metrics: list[str]
    anchor: str
    rows: list[BDRow]
    files: list[Path]
    compared_run_ids: list[str]
    text: str
    ratios: list = field(default_factory=list)  # ideal_gain.RatioRow


def _resolve_experiment(client, name: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no experiment {name!r} at {client.tracking_uri} "
                          f"(experiments: {', '.join(known) or 'none'})")
    return experiment


def build_curves(runs: Sequence, options: CompareOptions) -> list[Curve]:
    """Run curves, then the reference files, then JPEG; names are unique."""
    curves = curves_from_runs(runs, options.group_by, options.rate, mix_data=options.mix_data)
    curves += [load_reference(p) for p in options.references]
    if options.jpeg:
        labels = data_sets(runs)
        by_data = ([list(runs)] if options.mix_data or len(labels) == 1 else
                   [[r for r in runs if data_label(r) == label] for label in labels])
        jpegs = [jpeg_curve(group) for group in by_data]
        if not any(jpegs):
            raise ConfigError("--jpeg: none of the selected runs logged jpeg_bpp "
                              "(evaluate them with --jpeg true)")
        curves += [c if len(by_data) == 1 else
                   Curve(f"{c.name} @ {data_label(group[0])}", c.points, c.source)
                   for c, group in zip(jpegs, by_data) if c is not None]
    seen: dict[str, int] = {}
    unique = []
    for c in curves:
        seen[c.name] = seen.get(c.name, 0) + 1
        unique.append(c if seen[c.name] == 1 else Curve(f"{c.name} ({seen[c.name]})", c.points,
                                                         c.source))
    return unique


def choose_metrics(curves: Sequence[Curve], wanted: Sequence[str]) -> list[str]:
    available = sorted(set().union(*(c.metric_names() for c in curves)))
    if wanted:
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ConfigError(f"--metric {', '.join(missing)}: not logged by the compared runs "
                              f"(available: {', '.join(available) or 'none'})")
        return list(wanted)
    metrics = shared_metrics(curves)
    if not metrics:
        raise ConfigError("the compared runs share no quality metric "
                          f"(seen: {', '.join(available) or 'none'}); choose one with --metric")
    return metrics


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


def _log_run(client, experiment_id: str, files: Sequence[Path], options: CompareOptions, *,
             experiment: str, anchor: str, metrics: Sequence[str], curves: int,
             run_ids: Sequence[str], note: str) -> str:
    """Log ``files`` under ``comparison/`` of a new run (or of the run ``mlflow run`` opened for
    this entry point); only these files, whatever else the output folder holds.

    BD values are artifacts and the run's description, not metrics: metrics of a comparison
    run would add charts to the experiment's chart view, crowding out the bpp/PSNR scatter.
    """
    from mlflow.entities import Param, RunTag

    from taskcodec import tracking

    tags = {"comparison": "true", "entry_point": "compare", "compared_run_ids": run_ids_tag(run_ids),
            "mlflow.note.content": note, **tracking.environment_tags()}
    params = {"experiment": experiment, "filter": options.filter_string[:500],
              "group_by": options.group_by, "anchor": anchor, "bd_method": options.bd_method,
              "rate": options.rate,
              "metrics": ",".join(metrics)[:500], "curves": curves, "compared_runs": len(run_ids),
              "references": ",".join(Path(p).name for p in options.references)[:500],
              "jpeg": str(options.jpeg).lower(), "mix_data": str(options.mix_data).lower()}
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    created = not run_id
    if created:
        run_id = client.create_run(experiment_id, run_name=options.run_name or None).info.run_id
    status = "FAILED"
    try:
        already = client.get_run(run_id).data.params
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()
                                         if k not in already],
                         tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for path in files:
            client.log_artifact(run_id, str(path), "comparison")
        status = "FINISHED"
    finally:
        if created:
            with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL on stdout
                client.set_terminated(run_id, status)
    return run_id


def compare(options: CompareOptions) -> Comparison:
    """Select runs, build curves, compute BD tables, write and log everything."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from taskcodec import tracking
    from taskcodec.ideal_gain import format_ratios, ideal_gain_ratios, markdown_ratios

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    name = options.experiment or tracking.experiment_name()
    if options.run_ids:
        runs = select_runs(client, run_ids=options.run_ids, tags=options.tags)
        experiment_id = (_resolve_experiment(client, options.experiment).experiment_id
                         if options.experiment else runs[0].info.experiment_id if runs else "")
    else:
        experiment_id = _resolve_experiment(client, name).experiment_id
        runs = select_runs(client, experiment_ids=[experiment_id],
                           filter_string=options.filter_string, tags=options.tags)
    runs = [r for r in runs if options.rate in r.data.metrics]
    if not runs:
        what = (f"runs {', '.join(options.run_ids)}" if options.run_ids
                else f"experiment {name!r}" + (f" matching {options.filter_string!r}"
                                               if options.filter_string else ""))
        raise ConfigError(f"no run with a {options.rate} metric among {what} at {uri} "
                          "(evaluate checkpoints first: taskcodec evaluate --checkpoint RUN_ID)")
    curves = build_curves(runs, options)
    metrics = choose_metrics(curves, options.metrics)
    anchor = pick_anchor(curves, options.anchor or None)
    rows = bd_table(curves, anchor, metrics, options.bd_method)
    ratios = ideal_gain_ratios(curves, metrics, options.bd_method)
    run_ids = sorted({r.info.run_id for r in runs})
    text = "\n\n".join([format_curves(curves, metrics), format_bd(rows, anchor.name,
                                                                   options.bd_method)]
                        + ([format_ratios(ratios)] if ratios else []))
    if len(data_sets(runs)) > 1:
        text += (f"\n\nThe runs were evaluated on {len(data_sets(runs))} data sets "
                 f"({', '.join(data_sets(runs))}): "
                 + ("--mix-data put them into the same curves." if options.mix_data else
                    "one curve per data set (--mix-data to group them anyway)."))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(options.output_dir) if options.output_dir else Path(tmp)
        files = write_outputs(curves, metrics, rows, folder, anchor=anchor.name,
                              method=options.bd_method, run_ids=run_ids, rate=options.rate,
                              ratios=ratios)
        (folder / "summary.txt").write_text(text + "\n")
        files.append(folder / "summary.txt")
        run_id = _log_run(client, experiment_id, files, options,
                          experiment=name if not options.run_ids else options.experiment,
                          anchor=anchor.name, metrics=metrics, curves=len(curves),
                          run_ids=run_ids, note=markdown_bd(rows, anchor.name, options.bd_method)
                          + ("\n\n" + markdown_ratios(ratios) if ratios else ""))
        if not options.output_dir:
            files = [Path("comparison") / f.name for f in files]  # only in MLflow now
    return Comparison(run_id, experiment_id, curves, metrics, anchor.name, rows, files,
                      run_ids, text, ratios)
