"""Points and curves: evaluate runs grouped into RD curves, the anchors' points (JPEG, WebP,
AVIF), published reference results."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from taskcodec.config import ANCHORS, higher_is_better
from taskcodec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RATE = "bpp"
#: The curve of each anchor evaluate measured: "JPEG (Pillow)", ...
ANCHOR_CURVES = {name: f"{label} (Pillow)" for name, label in ANCHORS.items()}
JPEG_CURVE = ANCHOR_CURVES["jpeg"]

# Logged next to the quality metrics but not quality: rates, timings, training values, anchors.
_NOT_QUALITY_PREFIXES = ("bpp", *(f"{a}_" for a in ANCHORS), "val_", "train_", "bd_", "system/")
_NOT_QUALITY_SUFFIXES = ("_time", "_seconds", "loss", "_bytes")
_NOT_QUALITY = frozenset({"epoch", "step", "lr", "aux_lr", "images", "rate"})
_LABELS = {"psnr": "PSNR", "ms_ssim": "MS-SSIM", "map": "mAP", "miou": "mIoU",
           "abs_rel": "AbsRel", "rmse": "RMSE", "accuracy": "Accuracy",
           "top1": "Top-1 accuracy", "top5": "Top-5 accuracy"}


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
    replicate: str = ""  # the value of --replicates-by / --pair-by (a seed), "" without one
    # Rate per unit of 255² MSE the point was trained to trade (λ; 1/α for scalable layers):
    # what turns a distortion difference into bits per pixel at equal distortion.
    lagrange: float | None = None
    n: int = 1  # replicates averaged into this point
    # 95 % t-interval of the mean over the replicates: "rate" and each metric -> (low, high)
    ci: Mapping[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Curve:
    name: str
    points: tuple[Point, ...]
    source: str = "runs"  # runs | reference | an anchor's name (jpeg, webp, avif)

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
    return _operating_point(run)[0]


def _positive(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _operating_point(run) -> tuple[str, float | None]:
    """The label of a run's operating point (its λ or α) and its Lagrange multiplier in bpp
    per unit of 255² MSE (λ; 1/α for scalable layers, whose loss is α·R + 255²·MSE)."""
    lmbda = run.data.params.get("lmbda")
    if lmbda not in (None, "", "None"):
        return f"λ={lmbda}", _positive(lmbda)
    alpha = run.data.tags.get("alpha") or run.data.params.get("alpha")  # scalable: 1/lambda
    if alpha not in (None, "", "None"):
        value = _positive(alpha)
        return (f"α={value:g}" if value else f"α={alpha}"), (1 / value if value else None)
    return run.info.run_name or run.info.run_id[:8], None


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
                     mix_data: bool = False, replicate_key: str = "") -> list[Curve]:
    """One curve per value of ``group_by`` (a tag or param, or several joined by commas), with
    the logged metric ``rate`` as each point's rate.

    Runs evaluated on different data (by content digest) never share a curve: when the runs
    span several data sets each curve name ends in `` @ DATA``, unless ``mix_data``.
    ``replicate_key`` (a tag or param, such as ``seed``) is recorded on each point, for
    :func:`aggregate_replicates` and paired statistics.
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
        label, lagrange = _operating_point(run)
        replicate = group_value(run, [replicate_key]) if replicate_key else ""
        groups.setdefault(name, []).append(
            Point(bpp, quality, run.info.run_id, label, replicate, lagrange))
    return [make_curve(name, pts) for name, pts in sorted(groups.items())]


def aggregate_replicates(curve: Curve, confidence: float = 0.95) -> Curve:
    """One point per operating point (λ or α label) of ``curve``: the mean of its replicates'
    rates and metrics, with the ``confidence`` t-interval of each mean and their count.

    A metric enters a point's mean only when every replicate logged it.
    """
    from taskcodec.compare.statistics import mean_interval

    by_label: dict[str, list[Point]] = {}
    for p in curve.points:
        by_label.setdefault(p.label, []).append(p)
    points = []
    for label, group in by_label.items():
        if len(group) == 1:
            points.append(group[0])
            continue
        names = set.intersection(*(set(p.metrics) for p in group))
        ci, metrics = {}, {}
        mean_rate, *ci["rate"] = mean_interval([p.bpp for p in group], confidence)
        for name in sorted(names):
            metrics[name], *ci[name] = mean_interval([p.metrics[name] for p in group],
                                                     confidence)
        lagranges = {p.lagrange for p in group}
        points.append(Point(mean_rate, metrics, min(p.run_id for p in group), label,
                            lagrange=lagranges.pop() if len(lagranges) == 1 else None,
                            n=len(group), ci={k: tuple(v) for k, v in ci.items()}))
    return make_curve(curve.name, points, curve.source)


def replicate_curves(curve: Curve) -> dict[str, Curve]:
    """The points of each replicate (seed) of ``curve`` as a curve of its own."""
    by_replicate: dict[str, list[Point]] = {}
    for p in curve.points:
        by_replicate.setdefault(p.replicate, []).append(p)
    return {key: make_curve(curve.name, pts, curve.source)
            for key, pts in sorted(by_replicate.items())}


def pareto_front(curve: Curve, metric: str) -> tuple[Curve, list[Point]]:
    """The operational RD curve: the points of ``curve`` no other point beats in both rate
    and ``metric`` (no more bits for at least the quality), and the points it dropped."""
    sign = -1.0 if lower_is_better(metric) else 1.0
    pts = sorted((p for p in curve.points if metric in p.metrics),
                 key=lambda p: (p.bpp, -sign * p.metrics[metric]))
    kept, dropped, best = [], [], -math.inf
    for p in pts:
        quality = sign * p.metrics[metric]
        if quality > best:
            kept.append(p)
            best = quality
        else:
            dropped.append(p)
    return replace(curve, points=tuple(kept)), dropped


def anchor_curve(runs: Iterable, anchor: str = "jpeg") -> Curve | None:
    """The anchor (jpeg, webp or avif) at the rate of each run (the ``<anchor>_*`` metrics
    evaluate logs), as one curve; None when no run has them.

    Runs whose rates led evaluate to the same setting measured the same point; it is kept
    once (averaged), since a curve cannot hold two points at one rate.
    """
    prefix, label = f"{anchor}_", ANCHORS[anchor]
    by_rate: dict[float, list[tuple[str, dict[str, float]]]] = {}
    for run in runs:
        metrics = _finite(run.data.metrics)
        if f"{prefix}bpp" not in metrics:
            continue
        quality = {k[len(prefix):]: v for k, v in metrics.items()
                   if k.startswith(prefix) and k != f"{prefix}bpp"}
        by_rate.setdefault(metrics[f"{prefix}bpp"], []).append((run.info.run_id, quality))
    points = []
    for bpp, measured in by_rate.items():
        names = set.intersection(*(set(q) for _, q in measured))
        quality = {k: sum(q[k] for _, q in measured) / len(measured) for k in names}
        text = label if len(measured) == 1 else f"{label} ({len(measured)} runs)"
        points.append(Point(bpp, quality, min(r for r, _ in measured), text))
    return make_curve(ANCHOR_CURVES[anchor], points, anchor) if points else None


def jpeg_curve(runs: Iterable) -> Curve | None:
    """:func:`anchor_curve` of JPEG."""
    return anchor_curve(runs, "jpeg")


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


