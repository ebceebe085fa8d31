"""``make paper-check``: each paper's central claim, tested at CPU scale with a design fixed
before anything runs.

Per seed (the model's initialisation and training order; the data are the same for every
seed): two depth base layers, β = 0 and β > 0 (paper 2's task-compatible base); on each, the
paper-faithful ``conditional``, ``residual`` and paper 1's lower bound ``lower`` (simulcast)
at one α. Paper 1's upper bound is not trained: it is the lower bound's network with the
base's bits free (the same weights), and no hypothesis below uses it. Every run is evaluated
with real bitstreams on a fixed set of procedural scenes drawn with their own data seed, so
none of them selected a checkpoint (training validates on the data seed 0 set).
All of it runs in this one process (:mod:`taskcodec.driver`).

Hypotheses, each judged by code from per-seed paired differences (every seed against the same
seed's reference run), with Student-t and bootstrap intervals (:mod:`taskcodec.compare.
statistics`). ΔJ is the Lagrangian difference at the common α, as a share of the reference's
rate: the bits saved at equal distortion (negative: cheaper).

- H1 (paper 1): conditional and residual use the base: ΔJ against ``lower`` < 0.
- H2 (paper 1): conditional ≈ residual: ΔJ of residual against conditional within ±margin
  (two one-sided tests).
- H3 (paper 2): a β > 0 base makes the assisted reconstruction cheaper: ΔJ of conditional on
  the β > 0 base against conditional on the β = 0 base < 0 (rates include the base's bits).
- H4 (paper 2): β > 0 does not hurt the base task's RD: neither the base rate nor its depth
  error (AbsRel) grows by more than the margin (non-inferiority), per seed against β = 0.

Verdicts: *supported* (the interval lies on the claimed side), *not supported* (it lies on
the other side), *inconclusive at this scale* (anything else, or fewer than 2 seeds).

Sizes come from environment variables (:class:`Design`), so the same driver runs at toy size
in a test and at full size from ``make paper-check``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from taskcodec.errors import ConfigError

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = ("supported", "not supported",
                                          "inconclusive at this scale")
METHODS = ("conditional", "residual", "lower")
TEST_LEVEL = 0.05  # two-sided 95 % intervals; TOST at 5 %


@dataclass(frozen=True)
class Design:
    """Everything fixed before the check runs; ``PAPER_CHECK_<FIELD>`` overrides a field."""

    seeds: int = 5
    base_steps: int = 500
    enh_steps: int = 360
    image_size: int = 64
    batch_size: int = 8
    lr: float = 1e-3
    base_n: int = 16  # channels of the base (N = M)
    enh_n: int = 16  # channels of the enhancement (N = M)
    base_alpha: float = 0.1
    beta: float = 20.0  # the task-compatible base (β > 0)
    alpha: float = 128.0  # the enhancement's operating point
    val_images: int = 16  # checkpoint selection: data seed 0's validation scenes
    eval_images: int = 256  # the fixed evaluation set: its own data seed
    eval_data_seed: int = 1000
    margin_pct: float = 5.0  # H2 equivalence and H4 non-inferiority margin, % of the reference

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Design:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"PAPER_CHECK_{f.name.upper()}", "").strip()
            if raw:
                kind = type(getattr(cls, f.name))
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ConfigError(f"PAPER_CHECK_{f.name.upper()}={raw!r} is not "
                                      f"{'an integer' if kind is int else 'a number'}") from None
        design = cls(**values)
        design.check()
        return design

    def check(self) -> None:
        for name in ("seeds", "base_steps", "enh_steps", "eval_images", "val_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"paper-check {name}={getattr(self, name)} should be >= 1")
        if self.beta <= 0:
            raise ConfigError(f"paper-check beta={self.beta} should be > 0 (the contrast is "
                              "against beta = 0)")
        if self.eval_data_seed == 0:
            raise ConfigError("paper-check eval_data_seed=0 is the training data's seed: "
                              "the evaluation set must be distinct from checkpoint selection")


def _loop(d: Design, steps: int, seed: int) -> dict[str, Any]:
    return {"data": "scenes", "seed": seed, "data_seed": 0, "image_size": d.image_size,
            "batch_size": d.batch_size, "lr": d.lr, "lr_scheduler": "none", "epochs": 1000,
            "max_steps": steps, "epoch_length": steps * d.batch_size,
            "max_val_images": d.val_images, "log_every": 20}


def plan(d: Design) -> list[dict[str, Any]]:
    """The steps of the check: per seed, two bases, four enhancements on each, and an
    evaluation of every run on the fixed evaluation set."""
    steps: list[dict[str, Any]] = []
    evaluate = {"data_seed": d.eval_data_seed, "max_images": d.eval_images, "jpeg": False}
    for seed in range(d.seeds):
        for beta in (0.0, d.beta):
            base = f"base-b{beta:g}-s{seed}"
            steps.append({"name": base, "command": "train-base", "options": {
                **_loop(d, d.base_steps, seed), "task": "depth", "beta": beta,
                "alpha": d.base_alpha, "N": d.base_n, "M": d.base_n, "run_name": base}})
            steps.append({"name": f"eval-{base}", "command": "evaluate",
                          "options": {"checkpoint": f"${{{base}}}", "run_name": f"eval-{base}",
                                      **evaluate}})
            for method in METHODS:
                name = f"{method}-b{beta:g}-s{seed}"
                steps.append({"name": name, "command": "train-enhancement", "options": {
                    **_loop(d, d.enh_steps, seed), "base_run": f"${{{base}}}",
                    "method": method, "alpha": d.alpha, "N": d.enh_n, "M": d.enh_n,
                    "run_name": name}})
                steps.append({"name": f"eval-{name}", "command": "evaluate",
                              "options": {"checkpoint": f"${{{name}}}",
                                          "run_name": f"eval-{name}", **evaluate}})
    return steps


# -- judging ----------------------------------------------------------------------------------
@dataclass
class Row:
    hypothesis: str
    claim: str
    quantity: str
    seeds: int
    mean: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    effect_size: float
    test: str  # which test and its p-value
    verdict: str
    per_seed: dict[str, float]


def verdict_below(low: float, high: float, bound: float = 0.0) -> str:
    """The claim "the value is below ``bound``", judged by its interval."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if high < bound:
        return SUPPORTED
    if low > bound:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def verdict_equivalent(tost: float | None, low: float, high: float, margin: float) -> str:
    """The claim "the value lies within ±``margin``": TOST, or its interval wholly outside."""
    if tost is not None and math.isfinite(tost) and tost < TEST_LEVEL:
        return SUPPORTED
    if math.isfinite(low) and math.isfinite(high) and (low > margin or high < -margin):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """All parts of a claim: supported when each is, not supported when any is not."""
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if any(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _row(hypothesis: str, claim: str, quantity: str, values: Mapping[str, float], *,
         kind: str, margin: float) -> Row:
    from taskcodec.compare.statistics import estimate

    if not values:
        return Row(hypothesis, claim, quantity, 0, math.nan, math.nan, math.nan, math.nan,
                   math.nan, math.nan, "no paired seed", INCONCLUSIVE, {})
    est = estimate(list(values.values()), margin=margin if kind == "equivalent" else None)
    if kind == "below":
        verdict, test = verdict_below(est.t_low, est.t_high), f"t-test p={est.p_value:.3g}"
    elif kind == "not worse":
        verdict = verdict_below(est.t_low, est.t_high, margin)
        test = f"non-inferiority: upper bound < +{margin:g} %"
    else:
        verdict = verdict_equivalent(est.tost_p, est.t_low, est.t_high, margin)
        test = f"TOST ±{margin:g} %: p={est.tost_p:.3g}" if est.tost_p is not None else "TOST"
    if est.n < 2:
        verdict = INCONCLUSIVE
    return Row(hypothesis, claim, quantity, est.n, est.mean, est.t_low, est.t_high,
               est.boot_low, est.boot_high, est.effect_size, test, verdict, dict(values))


def _seed_curves(curves: Sequence, name: str) -> dict[str, Any]:
    from taskcodec.compare.curves import replicate_curves

    for curve in curves:
        if curve.name == name:
            return replicate_curves(curve)
    return {}


def _delta_j_pct(curves: Sequence, test: str, reference: str) -> dict[str, float]:
    """Per seed: ΔJ of ``test`` against ``reference`` in % of the reference's rate."""
    from taskcodec.compare.statistics import delta_j

    tests, refs = _seed_curves(curves, test), _seed_curves(curves, reference)
    out = {}
    for seed in sorted(set(tests) & set(refs)):
        ref = refs[seed]
        rate = sum(p.bpp for p in ref.points) / len(ref.points)
        out[seed] = 100 * delta_j(ref, tests[seed]) / rate
    return out


def _relative_change(curves: Sequence, test: str, reference: str, metric: str
                     ) -> dict[str, float]:
    """Per seed: % change of ``metric`` ("rate": the rate) of ``test`` against ``reference``."""
    tests, refs = _seed_curves(curves, test), _seed_curves(curves, reference)

    def value(curve) -> float:
        vals = [p.bpp if metric == "rate" else p.metrics[metric] for p in curve.points]
        return sum(vals) / len(vals)

    return {seed: 100 * (value(tests[seed]) / value(refs[seed]) - 1)
            for seed in sorted(set(tests) & set(refs))}


def judge(enh_curves: Sequence, base_curves: Sequence, d: Design) -> list[Row]:
    """The hypotheses' rows, from curves named ``method/beta`` (enhancements) and ``beta``
    (bases) whose points carry their seed."""
    b0, b1 = str(0.0), str(float(d.beta))  # as evaluate tags them
    m = d.margin_pct
    rows = []
    for beta in (b0, b1):
        for method in ("conditional", "residual"):
            rows.append(_row("H1", f"{method} uses the base (β = {beta})",
                             f"ΔJ {method}/{beta} vs lower/{beta} (% of rate)",
                             _delta_j_pct(enh_curves, f"{method}/{beta}", f"lower/{beta}"),
                             kind="below", margin=m))
    for beta in (b0, b1):
        rows.append(_row("H2", f"conditional ≈ residual (β = {beta})",
                         f"ΔJ residual/{beta} vs conditional/{beta} (% of rate)",
                         _delta_j_pct(enh_curves, f"residual/{beta}", f"conditional/{beta}"),
                         kind="equivalent", margin=m))
    rows.append(_row("H3", "a β > 0 base makes the assisted reconstruction cheaper",
                     f"ΔJ conditional/{b1} vs conditional/{b0} (% of rate)",
                     _delta_j_pct(enh_curves, f"conditional/{b1}", f"conditional/{b0}"),
                     kind="below", margin=m))
    rate = _row("H4", "β > 0 does not raise the base rate", f"base bpp β={b1} vs β={b0} (%)",
                _relative_change(base_curves, b1, b0, "rate"), kind="not worse", margin=m)
    error = _row("H4", "β > 0 does not raise the depth error",
                 f"base AbsRel β={b1} vs β={b0} (%)",
                 _relative_change(base_curves, b1, b0, "abs_rel"), kind="not worse", margin=m)
    rows += [rate, error]
    return rows


def overall(rows: Sequence[Row]) -> dict[str, str]:
    """One verdict per hypothesis: all of its rows."""
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r.hypothesis, []).append(r.verdict)
    return {h: combine(v) for h, v in by.items()}


# -- report -----------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.3g}"


def markdown(rows: Sequence[Row], d: Design, *, seconds: float, when: str) -> str:
    verdicts = overall(rows)
    lines = [f"# paper-check ({when})", "",
             f"Machine: {platform.node() or 'unknown'}, {platform.machine()}, "
             f"{os.cpu_count()} CPU(s), Python {platform.python_version()}; "
             f"{seconds / 60:.1f} min in one process.", "",
             "Design (fixed before the run): " + ", ".join(f"{k}={v}" for k, v in
                                                          asdict(d).items()), "",
             "| hyp. | claim | quantity | seeds | mean | 95 % t-interval | bootstrap | d_z "
             "| test | verdict |", "|---|---|---|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.hypothesis} | {r.claim} | {r.quantity} | {r.seeds} | {_fmt(r.mean)} "
                     f"| [{_fmt(r.t_low)}, {_fmt(r.t_high)}] "
                     f"| [{_fmt(r.boot_low)}, {_fmt(r.boot_high)}] | {_fmt(r.effect_size)} "
                     f"| {r.test} | {r.verdict} |")
    lines += ["", "Overall: " + "; ".join(f"{h} {v}" for h, v in verdicts.items()), "",
              "Negative ΔJ: fewer bits at equal distortion than the reference (per seed, the "
              "same seed's reference). Verdicts are computed, not written: supported = the "
              "interval lies on the claimed side; not supported = on the other side; "
              "otherwise inconclusive at this scale."]
    return "\n".join(lines) + "\n"


def plot_rows(rows: Sequence[Row], path: Path) -> Path:
    """Each row's mean with its 95 % t-interval (a forest plot), coloured by its verdict."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows, strict=True):
        if math.isfinite(r.mean):
            low = r.mean - r.t_low if math.isfinite(r.t_low) else 0
            high = r.t_high - r.mean if math.isfinite(r.t_high) else 0
            ax.errorbar([r.mean], [y], xerr=[[low], [high]], fmt="o", capsize=4,
                        color={SUPPORTED: "tab:green", NOT_SUPPORTED: "tab:red"}.get(
                            r.verdict, "tab:gray"))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(ys, [f"{r.hypothesis}: {r.quantity}" for r in rows], fontsize=7)
    ax.set_xlabel("mean over seeds, % (95 % t-interval)\n"
                  "green: supported, red: not supported, grey: inconclusive")
    fig.savefig(path, dpi=110)
    return path


def _log(folder: Path, files: Sequence[Path], note: str, d: Design, run_ids: Sequence[str]
         ) -> str:
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from taskcodec import tracking
    from taskcodec.compare.selection import run_ids_tag

    client = MlflowClient(tracking.tracking_uri())
    name = tracking.experiment_name()
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run_id = client.create_run(experiment_id, run_name="paper-check").info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in asdict(d).items()],
                     tags=[RunTag(k, v) for k, v in {
                         "comparison": "true", "entry_point": "paper-check",
                         "mlflow.note.content": note[:4900],
                         "compared_run_ids": run_ids_tag(run_ids),
                         **tracking.environment_tags()}.items()])
    for path in files:
        client.log_artifact(run_id, str(path), "paper-check")
    client.set_terminated(run_id)
    return run_id


@dataclass
class Result:
    run_id: str
    rows: list[Row]
    verdicts: dict[str, str]
    report: Path
    files: list[Path]


def run(d: Design | None = None, output_dir: Path | str = "outputs/paper-check",
        echo=print) -> Result:
    """Train, evaluate, judge, report and log the check (see the module's docstring)."""
    from mlflow.tracking import MlflowClient

    from taskcodec import tracking
    from taskcodec.compare.curves import aggregate_replicates, curves_from_runs
    from taskcodec.compare.report import plot_rd, write_points
    from taskcodec.driver import run_plan

    d = d or Design.from_env()
    d.check()
    start = time.monotonic()
    steps = plan(d)
    echo(f"paper-check: {len(steps)} steps ({d.seeds} seeds) in one process")
    done = run_plan(steps, on_step=lambda r: echo(f"  {r.name}: {r.run_id} ({r.seconds:.0f} s)"))
    client = MlflowClient(tracking.tracking_uri())
    evals = [client.get_run(r.run_id) for name, r in done.items() if name.startswith("eval-")]
    enh = [r for r in evals if r.data.tags.get("layer") == "scalable"]
    bases = [r for r in evals if r.data.tags.get("layer") == "base"]
    enh_curves = curves_from_runs(enh, "method,beta", replicate_key="seed")
    base_curves = curves_from_runs(bases, "beta", rate="bpp", replicate_key="seed")
    rows = judge(enh_curves, base_curves, d)
    seconds = time.monotonic() - start
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    note = markdown(rows, d, seconds=seconds, when=when)
    report = folder / "report.md"
    report.write_text(note)
    means = [aggregate_replicates(c) for c in enh_curves]
    files = [report, plot_rows(rows, folder / "hypotheses.png"),
             *plot_rd(means, "psnr", folder / "rd_psnr"),
             *plot_rd([aggregate_replicates(c) for c in base_curves], "abs_rel",
                      folder / "base_abs_rel"),
             *write_points(means, folder)]
    rows_path = folder / "hypotheses.json"
    rows_path.write_text(json.dumps({"design": asdict(d), "when": when, "seconds": seconds,
                                     "verdicts": overall(rows),
                                     "rows": [asdict(r) for r in rows]},
                                    indent=2, ensure_ascii=False, default=str) + "\n")
    files.append(rows_path)
    run_id = _log(folder, files, note, d, [r.info.run_id for r in evals])
    echo(note)
    echo(f"MLflow run: {run_id}")
    return Result(run_id, rows, overall(rows), report, files)


def main() -> None:
    import sys

    try:
        run(output_dir=os.environ.get("OUTPUT_DIR", "outputs/paper-check"))
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
