"""The plan driver: many trainings and evaluations in one process, every step checked first."""

from __future__ import annotations

import pytest

from taskcodec.driver import load_plan, parse_steps, run_plan
from taskcodec.errors import ConfigError

TINY_BASE = {"task": "depth", "N": 8, "M": 8, "image_size": 64, "batch_size": 2,
             "max_steps": 2, "epoch_length": 4, "max_val_images": 1, "log_every": 1}


@pytest.mark.parametrize("steps, message", [
    ([{"name": "a", "command": "fly"}], "command 'fly' is not one of"),
    ([{"name": "a", "command": "train-base"}, {"name": "a", "command": "train-base"}],
     "name 'a' is used twice"),
    ([{"name": "e", "command": "evaluate", "options": {"checkpoint": "${later}"}},
      {"name": "later", "command": "train-base"}], r"\$\{later\} names no earlier step"),
    ([{"name": "a", "command": "train-base", "options": {"max_stepz": 3}}],
     "plan step 'a' \\(train-base\\): unknown train-base setting max_stepz"),
    ([{"name": "a", "command": "train-base", "options": {"seed": -1}}], "seed=-1 is out of range"),
    ([{"name": "a", "command": "train-base", "oops": 1}], "unknown key 'oops'"),
    ("train-base", "a plan is a list of steps"),
])
def test_a_bad_plan_is_refused_before_anything_runs(steps, message):
    with pytest.raises(ConfigError, match=message):
        run_plan(steps)


def test_a_plan_refuses_to_run_inside_an_mlflow_run(monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    with pytest.raises(ConfigError, match="cannot run inside `mlflow run`"):
        run_plan([{"name": "a", "command": "train-base"}])


def test_plan_file_defaults_apply_under_each_step(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("defaults: {train-base: {task: depth, max_steps: 7}}\n"
                    "steps:\n"
                    "  - {name: b, command: train-base, options: {max_steps: 3}}\n"
                    "  - {name: e, command: evaluate, options: {checkpoint: '${b}'}}\n")
    base, evaluate = load_plan(path)
    assert base.options == {"task": "depth", "max_steps": 3}
    assert evaluate.options == {"checkpoint": "${b}"}
    with pytest.raises(ConfigError, match="plan defaults for unknown command 'fly'"):
        parse_steps([], {"fly": {}})


def test_trainings_and_evaluations_run_in_one_process_and_log_both_seeds(torch_one_thread):
    """One plan: a base, an evaluation on other scenes, and paper 1's baselines, upper
    starting from lower's weights (upper is lower's model charged fewer bits, so --init-from
    a lower run with method=upper is no architecture conflict: make scalable-demo does it)."""
    from mlflow.tracking import MlflowClient

    from taskcodec import tracking

    tiny = {k: v for k, v in TINY_BASE.items() if k != "task"}
    runs = run_plan([
        {"name": "base", "command": "train-base", "options": {**TINY_BASE, "seed": 3}},
        {"name": "eval", "command": "evaluate",
         "options": {"checkpoint": "${base}", "data_seed": 5, "max_images": 3, "jpeg": False}},
        {"name": "lower", "command": "train-enhancement",
         "options": {**tiny, "base_run": "${base}", "method": "lower"}},
        {"name": "upper", "command": "train-enhancement",
         "options": {**tiny, "base_run": "${base}", "method": "upper", "init_from": "${lower}"}},
    ])
    client = MlflowClient(tracking.tracking_uri())
    trained = client.get_run(runs["base"].run_id).data
    assert (trained.params["seed"], trained.params["data_seed"]) == ("3", "0")
    assert (trained.tags["seed"], trained.tags["data_seed"]) == ("3", "0")
    evaluated = client.get_run(runs["eval"].run_id).data
    assert evaluated.tags["evaluated_run_id"] == runs["base"].run_id
    assert (evaluated.params["seed"], evaluated.params["data_seed"]) == ("3", "5")
    assert (evaluated.tags["seed"], evaluated.tags["data_seed"]) == ("3", "5")
    assert evaluated.params["images"] == "3"
    assert runs["eval"].result["summary"]["bpp"] > 0
    upper = client.get_run(runs["upper"].run_id).data
    assert upper.params["method"] == "upper" and upper.tags["init_from"] == runs["lower"].run_id
