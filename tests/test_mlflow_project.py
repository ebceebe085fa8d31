"""``mlflow run`` of the MLProject as a new user runs it: no environment variables, a store that
is new or that ``mlflow ui`` created first. Runs land in ``taskcodec`` with their artifacts;
an artifact store the run cannot write is one ``Error:`` line when the run starts.

Each ``mlflow run`` costs seconds of start-up: the runs are made once per module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = {"N": 8, "M": 8, "patch_size": 32, "batch_size": 2, "epochs": 1, "epoch_length": 2,
        "max_val_images": 1, "max_side": 128, "log_every": 1}
STORES = ("fresh", "made-by-mlflow-ui")


def plugin_path(folder: Path) -> Path:
    """A folder whose dist-info declares pyproject.toml's MLflow entry points, as an install of
    taskcodec does (the shared environment may predate them)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = folder / "taskcodec_plugins-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: taskcodec-plugins\n"
                                   "Version: 0\n")
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
             for group, points in project["entry-points"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines))
    return folder


def ui_store(uri: str) -> None:
    """The store as ``mlflow ui`` creates it: served artifacts, so the Default experiment keeps
    them at ``mlflow-artifacts:/0``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, "mlflow-artifacts:/").engine.dispose()


def mlflow_runs(calls: list[tuple[Path, str, dict]], env: dict) -> list[tuple[int, str]]:
    """``mlflow run . -e ENTRY -P ...`` in each project folder, side by side (each spends most
    of its time starting up); their exit statuses and standard errors."""
    procs = []
    for project, entry_point, params in calls:
        args = [a for k, v in params.items() for a in ("-P", f"{k}={v}")]
        log = open(project / f"{entry_point}.log", "w+")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(
            [str(BIN / "mlflow"), "run", ".", "-e", entry_point, "--env-manager", "local",
             *args], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=log,
            stdin=subprocess.DEVNULL), log))
    results = []
    for proc, log in procs:
        try:
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> dict[str, dict]:
    """For each store: a fresh copy of the project (the MLProject file; the code comes from the
    environment), ``mlflow run . -e train`` then ``-e evaluate -P checkpoint=RUN_ID`` in it."""
    from mlflow.tracking import MlflowClient

    work = tmp_path_factory.mktemp("mlflow-project")
    plugins = plugin_path(work / "plugins")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", TQDM_DISABLE="1",
               MLFLOW_DISABLE_TELEMETRY="true", TASKCODEC_DATA_CACHE=str(work / "cache"),
               PYTHONPATH=os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(plugins)) if p))
    out = {}
    for store in STORES:
        project = work / store
        project.mkdir()
        shutil.copy(ROOT / "MLProject", project / "MLProject")
        out[store] = {"dir": project, "uri": f"sqlite:///{project / 'mlflow.db'}"}
        if store != "fresh":
            ui_store(out[store]["uri"])
    trained = mlflow_runs([(p["dir"], "train", {"max_steps": 1, **TINY}) for p in out.values()],
                          env)
    for (status, stderr), p in zip(trained, out.values()):
        assert status == 0, stderr[-3000:]
        client = MlflowClient(p["uri"])
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        p["train"] = run.info.run_id
    evaluated = mlflow_runs([(p["dir"], "evaluate", {"checkpoint": p["train"], "max_images": 1,
                                                     "max_side": 128, "jpeg": "false"})
                             for p in out.values()], env)
    for status, stderr in evaluated:
        assert status == 0, stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_mlflow_run_train_then_evaluate_land_in_taskcodec_with_artifacts(projects, store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(projects[store]["uri"])
    experiment = client.get_experiment_by_name("taskcodec")
    runs = {r.data.tags["entry_point"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"train", "evaluate"}
    assert runs["train"].info.run_id == projects[store]["train"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert client.search_runs(["0"]) == []  # nothing in MLflow's Default experiment
    names = {r: {f.path for f in client.list_artifacts(runs[r].info.run_id, folder)}
             for r, folder in (("train", "checkpoints"), ("evaluate", "evaluation"))}
    assert "checkpoints/last.pt" in names["train"]
    assert names["evaluate"] == {"evaluation/per_image.csv", "evaluation/reconstructions.png"}
    assert runs["evaluate"].data.tags["evaluated_run_id"] == projects[store]["train"]


def test_an_artifact_store_the_run_cannot_write_is_one_error_at_the_start(tmp_path,
                                                                         monkeypatch):
    """The experiment as the MLflow UI creates it (artifacts at mlflow-artifacts:/1) on a plain
    sqlite store: refused before training, by ``taskcodec train`` and under ``mlflow run``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    from taskcodec.cli.main import cli

    uri = os.environ["MLFLOW_TRACKING_URI"]
    store = SqlAlchemyStore(uri, "mlflow-artifacts:/")
    experiment_id = store.create_experiment("taskcodec")
    store.engine.dispose()
    monkeypatch.chdir(tmp_path)
    args = ["train", "--max-steps", "1", *[a for k, v in TINY.items()
                                           for a in (f"--{k}", str(v))]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.output.startswith("Error: experiment 'taskcodec' keeps its artifacts at "
                                    "mlflow-artifacts:/1, which only an MLflow server can write")
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in result.output
    client = MlflowClient(uri)
    assert client.search_runs([experiment_id]) == []  # no run was started
    # What mlflow run does: create the run, then start the entry point with its id.
    run_id = client.create_run(experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    for command in (args, ["evaluate", "--checkpoint", "0" * 32]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, command
        assert result.output.startswith("Error: experiment 'taskcodec' keeps its artifacts at "
                                        f"mlflow-artifacts:/1/{run_id}/artifacts"), result.output
