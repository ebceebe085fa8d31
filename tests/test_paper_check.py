"""make paper-check: verdicts decided by the numbers, and the whole driver at toy size."""

from __future__ import annotations

import math

import pytest

from taskcodec import paper_check as pc
from taskcodec.compare.curves import Curve, Point, make_curve
from taskcodec.errors import ConfigError


def seeded(name: str, values: dict[int, tuple[float, float]], alpha: float = 128.0,
           metric: str = "psnr") -> Curve:
    """A curve with one point per seed at one α: {seed: (bpp, metric)}."""
    return make_curve(name, [Point(bpp, {metric: q}, f"r{name}{s}", f"α={alpha:g}", str(s),
                                   1 / alpha) for s, (bpp, q) in values.items()])


def test_verdicts_follow_the_interval():
    assert pc.verdict_below(-3.0, -1.0) == pc.SUPPORTED
    assert pc.verdict_below(1.0, 3.0) == pc.NOT_SUPPORTED
    assert pc.verdict_below(-1.0, 1.0) == pc.INCONCLUSIVE
    assert pc.verdict_below(math.nan, math.nan) == pc.INCONCLUSIVE
    assert pc.verdict_equivalent(0.01, -1.0, 1.0, 5.0) == pc.SUPPORTED
    assert pc.verdict_equivalent(0.3, 6.0, 9.0, 5.0) == pc.NOT_SUPPORTED
    assert pc.verdict_equivalent(0.3, -1.0, 9.0, 5.0) == pc.INCONCLUSIVE
    assert pc.combine([pc.SUPPORTED, pc.SUPPORTED]) == pc.SUPPORTED
    assert pc.combine([pc.SUPPORTED, pc.NOT_SUPPORTED]) == pc.NOT_SUPPORTED
    assert pc.combine([pc.SUPPORTED, pc.INCONCLUSIVE]) == pc.INCONCLUSIVE


def test_judge_decides_each_hypothesis_from_paired_seeds():
    seeds = range(5)
    noise = [0.0, 0.004, -0.003, 0.002, -0.001]
    lower = {s: (1.0 + 0.1 * s, 30.0) for s in seeds}  # seeds differ: pairing removes it
    cheaper = {s: (0.8 + 0.1 * s + noise[s], 30.0) for s in seeds}  # -20 %ish at equal PSNR
    same_as_cheaper = {s: (0.8 + 0.1 * s - noise[s] / 2, 30.0) for s in seeds}
    enh = [seeded(f"{m}/{b}", v) for b in ("0.0", "20.0")
           for m, v in (("lower", lower), ("conditional", cheaper), ("residual", same_as_cheaper))]
    # the beta > 0 base: same rate, worse depth on every seed (H4 not supported)
    bases = [seeded("0.0", {s: (0.5, 0.20) for s in seeds}, 0.1, "abs_rel"),
             seeded("20.0", {s: (0.5 + 0.001 * noise[s], 0.30 + noise[s]) for s in seeds}, 0.1,
                    "abs_rel")]
    rows = pc.judge(enh, bases, pc.Design(beta=20.0))
    by = {(r.hypothesis, r.quantity): r for r in rows}
    h1 = by[("H1", "ΔJ conditional/0.0 vs lower/0.0 (% of rate)")]
    assert h1.seeds == 5 and h1.verdict == pc.SUPPORTED and h1.t_high < 0
    assert h1.per_seed["0"] == pytest.approx(-20.0)
    assert by[("H2", "ΔJ residual/0.0 vs conditional/0.0 (% of rate)")].verdict == pc.SUPPORTED
    h3 = by[("H3", "ΔJ conditional/20.0 vs conditional/0.0 (% of rate)")]
    assert h3.mean == pytest.approx(0.0) and h3.verdict == pc.INCONCLUSIVE  # identical curves
    assert by[("H4", "base AbsRel β=20.0 vs β=0.0 (%)")].verdict == pc.NOT_SUPPORTED
    assert pc.overall(rows) == {"H1": pc.SUPPORTED, "H2": pc.SUPPORTED, "H3": pc.INCONCLUSIVE,
                                "H4": pc.NOT_SUPPORTED}


def test_design_comes_from_the_environment_and_is_checked():
    d = pc.Design.from_env({"PAPER_CHECK_SEEDS": "7", "PAPER_CHECK_BETA": "5"})
    assert (d.seeds, d.beta, d.eval_images) == (7, 5.0, 256)
    with pytest.raises(ConfigError, match="PAPER_CHECK_SEEDS='five' is not an integer"):
        pc.Design.from_env({"PAPER_CHECK_SEEDS": "five"})
    with pytest.raises(ConfigError, match="distinct from checkpoint selection"):
        pc.Design.from_env({"PAPER_CHECK_EVAL_DATA_SEED": "0"})
    steps = pc.plan(d)
    assert len(steps) == 7 * 2 * (1 + len(pc.METHODS)) * 2
    evaluations = [s for s in steps if s["command"] == "evaluate"]
    assert {s["options"]["data_seed"] for s in evaluations} == {1000}
    assert all(s["options"]["max_images"] == 256 for s in evaluations)
    trainings = [s for s in steps if s["command"] != "evaluate"]
    assert {s["options"]["data_seed"] for s in trainings} == {0}
    assert {s["options"]["seed"] for s in trainings} == set(range(7))


def test_the_whole_check_at_toy_size_reports_and_logs(tmp_path, torch_one_thread):
    from mlflow.tracking import MlflowClient

    from taskcodec import tracking

    design = pc.Design(seeds=2, base_steps=1, enh_steps=1, image_size=64, batch_size=2,
                       base_n=8, enh_n=8, val_images=1, eval_images=2)
    result = pc.run(design, tmp_path / "out", echo=lambda *a: None)
    assert set(result.verdicts) == {"H1", "H2", "H3", "H4"}
    assert {r.verdict for r in result.rows} <= {pc.SUPPORTED, pc.NOT_SUPPORTED, pc.INCONCLUSIVE}
    assert all(r.seeds == 2 for r in result.rows)
    text = result.report.read_text()
    assert "| H1 |" in text and "| H4 |" in text and "eval_images=2" in text
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.tags["entry_point"] == "paper-check" and run.data.tags["comparison"] == "true"
    logged = {a.path.split("/")[-1] for a in client.list_artifacts(result.run_id, "paper-check")}
    assert {"report.md", "hypotheses.png", "hypotheses.json", "rd_psnr.png"} <= logged
    evaluated = [client.get_run(i) for i in run.data.tags["compared_run_ids"].split(",")]
    assert len(evaluated) == 2 * 2 * (1 + len(pc.METHODS))  # seeds x bases x (base + methods)
    assert {(r.data.params["data_seed"], r.data.params["images"]) for r in evaluated} == {
        ("1000", "2")}
