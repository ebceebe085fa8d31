"""Bjøntegaard deltas (VCEG-M33) between two curves, by the ``bjontegaard`` package, and the
BD table of a comparison."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from taskcodec.compare.curves import Curve, lower_is_better, metric_unit, pareto_front
from taskcodec.config import ANCHORS
from taskcodec.errors import ConfigError

BD_METHODS = ("pchip", "cubic")
MIN_BD_POINTS = 4  # a cubic through fewer points is not determined (VCEG-M33 uses four)


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
    dropped: str = ""  # --pareto: the points left off each curve's operational RD curve

    @property
    def reason(self) -> str:
        return self.bd_rate_error or self.bd_metric_error


def _fronts(curves: Sequence[Curve], metric: str) -> tuple[list[Curve], str]:
    """Each curve's Pareto front for ``metric``, and which points they dropped (one line)."""
    fronts, notes = [], []
    for curve in curves:
        front, dropped = pareto_front(curve, metric)
        fronts.append(front)
        if dropped:
            notes.append(f"{curve.name}: {', '.join(p.label or f'{p.bpp:.4g} bpp' for p in dropped)}")
    return fronts, "; ".join(notes)


def bd_both(anchor: Curve, test: Curve, metric: str, method: str
            ) -> tuple[float | None, str, float | None, str]:
    """(BD-rate, why not, BD-metric, why not) of ``test`` against ``anchor``: each is None with
    its reason where it cannot be computed."""
    rate = value = None
    rate_error = value_error = ""
    try:
        rate = bd_rate(anchor, test, metric, method)
    except ConfigError as err:
        rate_error = str(err)
    try:
        value = bd_metric(anchor, test, metric, method)
    except ConfigError as err:
        value_error = str(err)
    return rate, rate_error, value, value_error


def bd_table(curves: Sequence[Curve], anchor: Curve, metrics: Sequence[str],
             method: str = "pchip", *, pareto: bool = False) -> list[BDRow]:
    """BD-rate and BD-metric of every curve but the anchor, for every metric; with ``pareto``,
    between the curves' operational RD curves (Pareto fronts), naming the points dropped."""
    _check_method(method)
    rows = []
    for metric in metrics:
        for test in curves:
            if test.name == anchor.name:
                continue
            a, curve, dropped = anchor, test, ""
            if pareto:
                (a, curve), dropped = _fronts([anchor, test], metric)
            row = BDRow(curve.name, anchor.name, metric, dropped=dropped)
            ar, aq = a.series(metric)
            tr, tq = curve.series(metric)
            if ar and tr:
                row.rate_overlap, row.quality_overlap = overlap(ar, tr), overlap(aq, tq)
            row.bd_rate, row.bd_rate_error, row.bd_metric, row.bd_metric_error = bd_both(
                a, curve, metric, method)
            rows.append(row)
    return rows


def pick_anchor(curves: Sequence[Curve], anchor: str | None) -> Curve:
    """The named curve (exact, else case-insensitive, else a unique prefix such as "jpeg");
    by default the first reference curve, else an anchor (JPEG, WebP, AVIF in that order), else
    the first curve in name order."""
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
    for source in ("reference", *ANCHORS, "runs"):
        for curve in curves:
            if curve.source == source:
                return curve
    return curves[0]


