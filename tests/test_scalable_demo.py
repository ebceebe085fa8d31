"""`make scalable-demo` end to end, at toy sizes: the exact script users run.

The script writes one plan (two detection bases, a start and fine-tuned points per curve,
paper 1's baselines and paper 2's standalone-refit, an evaluate with real layered bitstreams per
point), runs it in one process (`taskcodec run-plan`), then compares, on the embedded scenes
with a real sqlite MLflow store. Steps are cut to 1-2 per run and one alpha, so the figures
mean nothing; what is checked is the plumbing: every run is there with its lineage, the
comparison reads exactly this invocation's evaluate runs and writes its files.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scalable_demo_trains_evaluates_and_compares_every_curve(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "BASE_STEPS": "2", "PRE_STEPS": "2", "FT_STEPS": "1", "ALPHAS": "256", "BETA": "5",
           "IMAGE_SIZE": "64", "VAL_IMAGES": "2", "EVAL_IMAGES": "3", "OUTPUT_DIR": str(out),
           "MLFLOW_EXPERIMENT_NAME": "demo-test"}
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    # an evaluate run from an earlier pipeline in the same experiment must stay out of the plot
    stale = client.create_run(client.create_experiment("demo-test"),
                              tags={"entry_point": "evaluate", "method": "standalone"})
    client.log_metric(stale.info.run_id, "bpp", 0.5)
    client.log_metric(stale.info.run_id, "psnr", 99.0)
    done = subprocess.run([str(ROOT / "scripts" / "scalable-demo")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]

    with open(out / "points.csv", newline="") as f:
        points = list(csv.DictReader(f))
    curves = sorted({p["curve"] for p in points})
    assert curves == ["base-detection-beta0/0.0", "base-detection-beta5/5.0",
                      "conditional/0.0", "conditional/5.0", "lower/0.0", "residual/0.0",
                      "standalone-refit/0.0", "upper/0.0"]
    assert stale.info.run_id not in {p["run_id"] for p in points}
    compared = json.loads((out / "compared_runs.json").read_text())
    assert len(compared["run_ids"]) == len(points) == 8
    assert (out / "rd_psnr.png").stat().st_size > 0 and (out / "bd.csv").is_file()
    enh = {p["curve"].split("/")[0]: p for p in points if not p["curve"].startswith("base-")}
    assert {p["label"] for p in enh.values()} == {"α=256"}
    assert all(float(p["psnr"]) > 0 and float(p["bpp"]) > 0 for p in enh.values())
    # upper is lower with the base bits free: the same model, charged less
    assert enh["upper"]["psnr"] == enh["lower"]["psnr"]
    assert float(enh["upper"]["bpp"]) < float(enh["lower"]["bpp"])
    # paper 1's ratio is attempted for each method against the beta=0 baselines (one point per
    # curve here: the rows say why BD cannot be computed)
    ratios = {r["curve"] for r in csv.DictReader(open(out / "ratio.csv", newline=""))}
    assert ratios == {"conditional/0.0", "residual/0.0", "standalone-refit/0.0"}
    # paper 2's beta contrast is anchored on conditional/0, not on a baseline
    contrast = json.loads((out / "beta-contrast" / "bd.json").read_text())
    assert contrast["anchor"] == "conditional/0.0"
    assert {r["curve"] for r in contrast["rows"]} == {"conditional/5.0"}

    # lineage: every point was fine-tuned from its curve's start run, on the right base
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("demo-test").experiment_id], max_results=200)}
    for name, start in [("conditional-beta0-a256", "conditional-beta0-start"),
                        ("residual-beta0-a256", "residual-beta0-start"),
                        ("lower-beta0-a256", "lower-beta0-start"),
                        ("upper-beta0-a256", "lower-beta0-start"),
                        ("standalone-refit-beta0-a256", "conditional-beta0-a256"),
                        ("conditional-beta5-a256", "conditional-beta5-start")]:
        assert runs[name].data.tags["init_from"] == runs[start].info.run_id, name
    assert (runs["conditional-beta5-a256"].data.tags["base_run_id"]
            == runs["base-beta5"].info.run_id)
    assert runs["eval-residual-beta0-a256"].data.tags["entry_point"] == "evaluate"
    # evaluated on scenes that selected no checkpoint (training validates on data seed 0)
    evaluated = runs["eval-residual-beta0-a256"].data.params
    assert (evaluated["data_seed"], evaluated["images"]) == ("1000", "3")
    assert runs["standalone-refit-beta0-a256"].data.tags["baseline_of"] == "paper2-standalone"
    assert runs["eval-upper-beta0-a256"].data.tags["baseline_of"] == "paper1-upper"

    # one plan, run in one process: a step per training and evaluation, each one of the runs
    plan = json.loads((out / "plan.json").read_text())["steps"]
    done = json.loads((out / "runs.json").read_text())
    assert [s["name"] for s in plan] == list(done)
    assert len(plan) == 20 and sum(s["command"] == "evaluate" for s in plan) == 8
    for name, step in done.items():
        assert runs[name].info.run_id == step["run_id"], name
    assert {"scalable-demo", "scalable-demo-beta"} <= set(runs)
