"""Paper 1's share of the ideal gain: how much of what a free base could give a method gets.

A. de Andrade, A. Harell, Y. Foroutan and I. V. Bajić, "Conditional and Residual Methods in
Scalable Coding for Humans and Machines" (ICME CfM 2023) bracket every scalable method between
a *lower* baseline (simulcast: an independent codec for the target, charged the base's bits
too) and an *upper* baseline (the same codec, base bits free), and report BD(method vs lower) /
BD(upper vs lower). Here curves are paired by name: a curve named ``lower`` (alone or as one
``/`` part of a ``--group-by`` name such as ``lower/0.0``), the curve named the same with
``upper`` in that part, and every other run curve whose name differs only in that part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taskcodec.compare import Curve, _check_method, write_rows
from taskcodec.compare.bd import bd_both


@dataclass
class RatioRow:
    """Paper 1's ratio for one curve and metric: its BD against the lower baseline over the
    upper baseline's (1: all of the ideal gain, 0: none); None with the reason otherwise."""

    curve: str
    lower: str
    upper: str
    metric: str
    bd_rate: float | None = None
    bd_rate_upper: float | None = None
    ratio_rate: float | None = None
    bd_metric: float | None = None
    bd_metric_upper: float | None = None
    ratio_metric: float | None = None
    error: str = ""


def _share(value: float | None, ideal: float | None) -> float | None:
    return value / ideal if value is not None and ideal else None


def _bd_pair(lower: Curve, curve: Curve, metric: str, method: str
             ) -> tuple[float | None, float | None, str]:
    rate, rate_error, value, value_error = bd_both(lower, curve, metric, method)
    return rate, value, "; ".join(e for e in (rate_error, value_error) if e)


def baseline_groups(curves: Sequence[Curve]) -> list[tuple[Curve, Curve, list[Curve]]]:
    """(lower, upper, other curves of their group) for every lower baseline curve with an upper
    one: names equal but for one ``/`` part, ``lower`` vs ``upper`` vs anything else."""
    by_name = {c.name: c for c in curves if c.source == "runs"}
    groups = []
    for lower in by_name.values():
        parts = lower.name.split("/")
        for i in (i for i, part in enumerate(parts) if part == "lower"):
            upper = by_name.get("/".join([*parts[:i], "upper", *parts[i + 1:]]))
            if upper is None:
                continue
            others = [c for c in by_name.values()
                      if len(other := c.name.split("/")) == len(parts)
                      and other[i] not in ("lower", "upper")
                      and all(other[j] == parts[j] for j in range(len(parts)) if j != i)]
            groups.append((lower, upper, others))
    return groups


def ideal_gain_ratios(curves: Sequence[Curve], metrics: Sequence[str],
                      method: str = "pchip") -> list[RatioRow]:
    """Paper 1's ratio, BD(curve vs lower) / BD(upper vs lower), of BD-rate and BD-metric."""
    _check_method(method)
    rows = []
    for lower, upper, others in baseline_groups(curves):
        for metric in metrics:
            up_rate, up_value, up_error = _bd_pair(lower, upper, metric, method)
            for curve in (c for c in others if c.series(metric)[0]):  # e.g. a base's curve
                rate, value, error = _bd_pair(lower, curve, metric, method)
                reason = "; ".join(e for e in (f"upper: {up_error}" if up_error else "", error)
                                   if e)
                rows.append(RatioRow(curve.name, lower.name, upper.name, metric, rate, up_rate,
                                     _share(rate, up_rate), value, up_value,
                                     _share(value, up_value), reason))
    return rows


def format_ratios(rows: Sequence[RatioRow]) -> str:
    width = max([len(r.curve) for r in rows] + [5]) + 2
    head = (f"{'curve':<{width}}{'metric':<10}{'of BD-rate':>12}{'of BD-metric':>14}")
    lines = ["Share of the ideal gain (paper 1): BD vs lower / BD of upper vs lower", head,
             "-" * len(head)]
    for r in rows:
        cells = [f"{v:.3f}" if v is not None else "n/a" for v in (r.ratio_rate, r.ratio_metric)]
        line = f"{r.curve:<{width}}{r.metric:<10}{cells[0]:>12}{cells[1]:>14}"
        lines.append(line + (f"   ({r.error})" if r.error else ""))
    return "\n".join(lines)


def write_ratios(rows: Sequence[RatioRow], folder: Path) -> list[Path]:
    """ratio.csv and ratio.json: paper 1's share of the ideal gain per curve and metric."""
    return write_rows(rows, list(RatioRow.__dataclass_fields__), folder / "ratio", {})


def markdown_ratios(rows: Sequence[RatioRow]) -> str:
    lines = ["**Share of the ideal gain** (paper 1: BD vs lower / BD of upper vs lower)", "",
             "| curve | metric | of BD-rate | of BD-metric | note |", "|---|---|---:|---:|---|"]
    for r in rows:
        cells = [f"{v:.3f}" if v is not None else "n/a" for v in (r.ratio_rate, r.ratio_metric)]
        lines.append(f"| {r.curve} | {r.metric} | {cells[0]} | {cells[1]} | {r.error} |")
    return "\n".join(lines)
