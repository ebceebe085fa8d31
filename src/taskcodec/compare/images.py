"""The bootstrap over images: how much a BD-rate between two curves of single runs owes to the
particular images they were evaluated on.

Every evaluate run logs its results per image (``evaluation/per_image.csv``: one row per image,
its rates and quality); the run's logged ``bpp`` and ``psnr`` are their means. The images are
resampled with replacement, the same resample for every run of a pair of curves (the runs saw
the same images, so the pairing by image is kept); each point's means are recomputed, then the
BD-rate and BD-metric; the percentile interval of those is reported (B. Efron, R. Tibshirani,
"An Introduction to the Bootstrap", 1993, ch. 13). Resamples come from numpy's default
generator (PCG64) seeded with ``seed``: the same comparison gives the same interval.

What it answers: would other images of the same kind give the same delta? Not: would another
training run? (that is ``--pair-by seed``; a curve of replicates is refused here).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from taskcodec.compare.bd import bd_both
from taskcodec.compare.curves import Curve, Point, _finite, make_curve, pareto_front
from taskcodec.errors import ConfigError

PER_IMAGE_ARTIFACT = "evaluation/per_image.csv"
GENERATOR = "numpy.random.default_rng (PCG64)"

# index -> column -> value: one run's per-image results
Table = Mapping[int, Mapping[str, float]]


@dataclass
class ImageBootstrapRow:
    """BD-rate and BD-metric of ``curve`` against ``anchor`` on all images, and their
    percentile intervals over resamples of the images. A resample whose curves admit no
    BD value (quality that no longer rises with rate) is left out and counted."""

    curve: str
    anchor: str
    metric: str
    images: int = 0
    resamples: int = 0
    seed: int = 0
    confidence: float = 0.95
    bd_rate: float | None = None
    bd_rate_low: float | None = None
    bd_rate_high: float | None = None
    bd_metric: float | None = None
    bd_metric_low: float | None = None
    bd_metric_high: float | None = None
    bd_rate_failed: int = 0
    bd_metric_failed: int = 0
    error: str = ""


FIELDS = [f.name for f in fields(ImageBootstrapRow)]


def check_resamples(resamples: int) -> None:
    if resamples < 0 or (0 < resamples < 100):
        raise ConfigError(f"--bootstrap-images {resamples} should be 0 (off) or >= 100 "
                          "resamples (a percentile interval from fewer is mostly noise)")


def read_per_image(path: Path | str) -> dict[int, dict[str, float]]:
    """A ``per_image.csv`` as {image index: {column: value}} (non-numeric cells left out)."""
    table: dict[int, dict[str, float]] = {}
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            values = _finite(row)
            table[int(values.pop("index", i))] = values
    return table


def fetch_per_image(client, run_ids: Sequence[str], folder: Path) -> tuple[dict[str, Table],
                                                                           dict[str, str]]:
    """Each run's per-image results from its artifacts, and why a run has none."""
    tables, missing = {}, {}
    for run_id in sorted(set(run_ids)):
        try:
            path = client.download_artifacts(run_id, PER_IMAGE_ARTIFACT, str(folder / run_id))
            tables[run_id] = read_per_image(path)
        except Exception as err:  # MlflowException, OSError: the row says why
            missing[run_id] = (f"run {run_id} has no readable {PER_IMAGE_ARTIFACT} "
                               f"({str(err).splitlines()[0][:120]})")
    return tables, missing


def _columns(curve: Curve, tables: Mapping[str, Table], images: list[int], rate: str,
             metric: str):
    """(rates, values): arrays of shape (points, images) of the curve's runs, in point order."""
    import numpy as np

    rates, values = [], []
    for p in curve.points:
        table = tables[p.run_id]
        for column in (rate, metric):
            absent = [i for i in images if column not in table[i]]
            if absent:
                have = ", ".join(sorted(table[absent[0]])) or "nothing"
                raise ConfigError(f"{metric if column == metric else rate} is not logged per "
                                  f"image by run {p.run_id} (image {absent[0]} has: {have})")
        rates.append([table[i][rate] for i in images])
        values.append([table[i][metric] for i in images])
    return np.asarray(rates, dtype=float), np.asarray(values, dtype=float)


def _curve(like: Curve, rates, values, metric: str, pareto: bool) -> Curve:
    curve = make_curve(like.name, [Point(float(r), {metric: float(v)}, p.run_id, p.label)
                                   for p, r, v in zip(like.points, rates, values, strict=True)])
    return pareto_front(curve, metric)[0] if pareto else curve


def _interval(values: list[float], confidence: float) -> tuple[float | None, float | None]:
    import numpy as np

    if not values:
        return None, None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.asarray(values), [tail, 100 - tail])
    return float(low), float(high)


def _one_pair(anchor: Curve, test: Curve, metric: str, tables: Mapping[str, Table],
              row: ImageBootstrapRow, *, rate: str, method: str, pareto: bool) -> None:
    import numpy as np

    runs = [p.run_id for p in (*anchor.points, *test.points)]
    images = sorted(set.intersection(*(set(tables[r]) for r in runs)))
    if len(images) < 2:
        raise ConfigError(f"the runs of {anchor.name!r} and {test.name!r} share "
                          f"{len(images)} evaluated image(s); the bootstrap needs at least 2")
    row.images = len(images)
    (ra, qa), (rt, qt) = (_columns(c, tables, images, rate, metric) for c in (anchor, test))
    full = bd_both(_curve(anchor, ra.mean(1), qa.mean(1), metric, pareto),
                   _curve(test, rt.mean(1), qt.mean(1), metric, pareto), metric, method)
    row.bd_rate, row.bd_metric = full[0], full[2]
    if row.bd_rate is None and row.bd_metric is None:
        raise ConfigError(full[1] or full[3])
    # one resample of the image indices for every run: the images stay paired across runs
    picks = np.random.default_rng(row.seed).integers(0, len(images),
                                                     size=(row.resamples, len(images)))
    means = [m[:, picks].mean(-1) for m in (ra, qa, rt, qt)]  # (points, resamples) each
    rates, values = [], []
    for b in range(row.resamples):
        a = _curve(anchor, means[0][:, b], means[1][:, b], metric, pareto)
        t = _curve(test, means[2][:, b], means[3][:, b], metric, pareto)
        bd_rate, _, bd_metric, _ = bd_both(a, t, metric, method)
        if bd_rate is not None:
            rates.append(bd_rate)
        if bd_metric is not None:
            values.append(bd_metric)
    row.bd_rate_failed = row.resamples - len(rates) if row.bd_rate is not None else 0
    row.bd_metric_failed = row.resamples - len(values) if row.bd_metric is not None else 0
    if row.bd_rate is not None:
        row.bd_rate_low, row.bd_rate_high = _interval(rates, row.confidence)
    if row.bd_metric is not None:
        row.bd_metric_low, row.bd_metric_high = _interval(values, row.confidence)
    reasons = [r for r in (full[1] and f"BD-rate: {full[1]}", full[3] and f"BD-metric: {full[3]}")
               if r]
    row.error = "; ".join(reasons)


def image_bootstrap(curves: Sequence[Curve], anchor: Curve, metrics: Sequence[str],
                    tables: Mapping[str, Table], *, missing: Mapping[str, str] | None = None,
                    rate: str = "bpp", method: str = "pchip", resamples: int = 1000,
                    seed: int = 0, confidence: float = 0.95, pareto: bool = False
                    ) -> list[ImageBootstrapRow]:
    """One row per run curve and metric: BD against ``anchor`` with percentile intervals over
    ``resamples`` resamples of the images (``tables``: per-image results by run id;
    ``missing``: why a run has none). A pair that cannot be bootstrapped keeps its row, with
    the reason."""
    check_resamples(resamples)
    missing = missing or {}
    rows = []
    for metric in metrics:
        for test in curves:
            if test.name == anchor.name or test.source != "runs":
                continue
            row = ImageBootstrapRow(test.name, anchor.name, metric, resamples=resamples,
                                    seed=seed, confidence=confidence)
            rows.append(row)
            if anchor.source != "runs":
                row.error = (f"the anchor {anchor.name!r} is a {anchor.source} curve: it has no "
                             "per-image results to resample")
                continue
            absent = [missing.get(p.run_id, f"run {p.run_id} has no per-image results")
                      for p in (*anchor.points, *test.points) if p.run_id not in tables]
            if absent:
                row.error = absent[0]
                continue
            try:
                _one_pair(anchor, test, metric, tables, row, rate=rate, method=method,
                          pareto=pareto)
            except ConfigError as err:
                row.error = str(err)
    return rows
