"""Is an effect real: intervals over replicates, BD per seed against the same seed's anchor,
equivalence tests.

Every distribution comes from :mod:`scipy.stats` (t quantiles, one-sample t-tests, the
bootstrap); every Bjøntegaard delta from :mod:`taskcodec.compare.bd` (the ``bjontegaard``
package). A replicate is a value of ``--pair-by`` (a seed): per seed, the test curve and the
anchor curve are compared on their own points, so whatever the seed changes in both cancels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from taskcodec.compare.bd import bd_metric, bd_rate
from taskcodec.compare.curves import Curve, metric_unit, pareto_front, replicate_curves
from taskcodec.errors import ConfigError

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
QUANTITIES = ("bd_rate", "bd_metric", "delta_j")


def check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence {confidence!r} is not between 0 and 1 (e.g. 0.95)")


def _sd(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 when the values agree to rounding (a t-test of values that
    differ by 1e-14 only measures the floating point)."""
    import numpy as np

    if len(values) < 2:
        return math.nan
    sd = float(np.std(values, ddof=1))
    return 0.0 if sd <= 1e-9 * max(1.0, abs(float(np.mean(values)))) else sd


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE
                  ) -> tuple[float, float, float]:
    """Mean and its two-sided Student-t interval; zero width when the values agree, NaN
    bounds for a single value."""
    from scipy import stats

    mean = sum(values) / len(values)
    sd = _sd(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    if sd == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean,
                                 scale=sd / math.sqrt(len(values)))
    return mean, float(low), float(high)


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (scipy.stats.bootstrap, seeded)."""
    import numpy as np
    from scipy import stats

    if len(values) < 2:
        return math.nan, math.nan
    if _sd(values) == 0:
        mean = sum(values) / len(values)
        return mean, mean
    result = stats.bootstrap((np.asarray(values, dtype=float),), np.mean,
                             confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def t_test_p(values: Sequence[float], null: float = 0.0) -> float:
    """Two-sided one-sample t-test p-value of mean == ``null`` (paired: of the differences)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan
    if _sd(values) == 0:
        return 1.0 if math.isclose(sum(values) / len(values), null, abs_tol=1e-9) else 0.0
    return float(stats.ttest_1samp(values, null).pvalue)


def tost_p(values: Sequence[float], margin: float) -> float:
    """Two one-sided t-tests: p-value of "the mean lies within ±``margin``" (equivalence when
    it is below the test level)."""
    from scipy import stats

    if margin <= 0:
        raise ConfigError(f"--equivalence-margin {margin!r} should be > 0")
    if len(values) < 2:
        return math.nan
    if _sd(values) == 0:
        return 0.0 if abs(sum(values) / len(values)) < margin else 1.0
    lower = stats.ttest_1samp(values, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(values, margin, alternative="less").pvalue
    return float(max(lower, upper))


@dataclass
class Estimate:
    """What replicates say about one quantity: mean, spread, intervals, tests."""

    n: int
    mean: float
    sd: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    effect_size: float  # Cohen's d_z: mean / sd of the paired differences
    p_value: float  # two-sided t-test of mean == 0
    tost_p: float | None = None  # with an equivalence margin

    def excludes_zero(self) -> bool:
        return self.t_low > 0 or self.t_high < 0


def estimate(values: Sequence[float], confidence: float = CONFIDENCE,
             margin: float | None = None, seed: int = 0) -> Estimate:
    check_confidence(confidence)
    values = [float(v) for v in values]
    if not values:
        raise ConfigError("no replicate to estimate from")
    mean, low, high = mean_interval(values, confidence)
    sd = _sd(values)
    effect = (mean / sd if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0) \
        if len(values) > 1 else math.nan
    return Estimate(len(values), mean, sd, low, high, *bootstrap_interval(values, confidence, seed),
                    effect, t_test_p(values), tost_p(values, margin) if margin else None)


@dataclass
class PairedRow:
    """One quantity of one curve against the anchor, computed per seed and then estimated."""

    curve: str
    anchor: str
    metric: str
    quantity: str  # bd_rate (%) | bd_metric (metric unit) | delta_j (bpp at equal distortion)
    unit: str
    seeds: int = 0
    mean: float | None = None
    sd: float | None = None
    t_low: float | None = None
    t_high: float | None = None
    boot_low: float | None = None
    boot_high: float | None = None
    effect_size: float | None = None
    p_value: float | None = None
    tost_p: float | None = None
    per_seed: str = ""  # JSON {seed: value}
    error: str = ""
    values: dict[str, float] = field(default_factory=dict, repr=False)


def delta_j(anchor: Curve, test: Curve) -> float:
    """Lagrangian difference ΔJ = ΔR + λ·255²·ΔMSE of ``test`` against ``anchor``, averaged
    over the operating points (λ/α labels) both hold: to first order the rate difference at
    equal distortion, in bits per pixel (negative: ``test`` is cheaper). Needs PSNR and each
    point's Lagrange multiplier (from its λ or α)."""
    mine = {p.label: p for p in anchor.points}
    diffs = []
    for p in test.points:
        a = mine.get(p.label)
        if a is None or "psnr" not in p.metrics or "psnr" not in a.metrics:
            continue
        if p.lagrange is None or a.lagrange is None:
            raise ConfigError(f"curve {test.name!r}: ΔJ needs the λ or α of point {p.label!r}")
        mse_t, mse_a = 10 ** (-p.metrics["psnr"] / 10), 10 ** (-a.metrics["psnr"] / 10)
        diffs.append((p.bpp - a.bpp) + a.lagrange * 255 ** 2 * (mse_t - mse_a))
    if not diffs:
        raise ConfigError(f"curves {test.name!r} and {anchor.name!r} share no operating point "
                          "with PSNR; ΔJ needs one")
    return sum(diffs) / len(diffs)


def _per_seed(quantity: str, anchor: Curve, test: Curve, metric: str, method: str,
              pareto: bool) -> float:
    if quantity == "delta_j":
        return delta_j(anchor, test)
    if pareto:
        anchor, test = pareto_front(anchor, metric)[0], pareto_front(test, metric)[0]
    return (bd_rate if quantity == "bd_rate" else bd_metric)(anchor, test, metric, method)


def paired_table(curves: Sequence[Curve], anchor: Curve, metrics: Sequence[str],
                 method: str = "pchip", *, confidence: float = CONFIDENCE,
                 margin: float | None = None, pareto: bool = False) -> list[PairedRow]:
    """BD-rate, BD-metric and (for PSNR) ΔJ of every run curve against ``anchor``, per seed
    (the points' ``replicate``) against the same seed's anchor, then their :class:`Estimate`.
    A quantity no seed can give keeps its row, with the first seed's reason."""
    anchors = replicate_curves(anchor)
    rows = []
    for metric in metrics:
        for curve in curves:
            if curve.name == anchor.name or curve.source != "runs":
                continue
            tests = replicate_curves(curve)
            seeds = sorted(set(tests) & set(anchors))
            for quantity in QUANTITIES:
                if quantity == "delta_j" and metric != "psnr":
                    continue
                unit = {"bd_rate": "%", "delta_j": "bpp"}.get(quantity, metric_unit(metric))
                row = PairedRow(curve.name, anchor.name, metric, quantity, unit)
                errors = []
                for seed in seeds:
                    try:
                        row.values[seed] = _per_seed(quantity, anchors[seed], tests[seed],
                                                     metric, method, pareto)
                    except ConfigError as err:
                        errors.append(f"seed {seed}: {err}")
                if not seeds:
                    row.error = f"no seed in common with the anchor {anchor.name!r}"
                elif errors:
                    row.error = errors[0] + (f" (and {len(errors) - 1} more seeds)"
                                             if len(errors) > 1 else "")
                if row.values and not errors:
                    est = estimate(list(row.values.values()), confidence, margin)
                    row.seeds = est.n
                    for name in ("mean", "sd", "t_low", "t_high", "boot_low", "boot_high",
                                 "effect_size", "p_value", "tost_p"):
                        setattr(row, name, getattr(est, name))
                row.per_seed = json.dumps(row.values)
                rows.append(row)
    return rows
