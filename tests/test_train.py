"""Training as MLflow runs, end to end: ``mlflow run`` of train then evaluate against a real
server, resuming after SIGKILL, checkpoint-and-exit on SIGTERM, a tracking server that is
away at start or disappears mid-training, a non-finite loss, ``--init-from`` and early
stopping.

Every run is a tiny codec (N=M=8) on 32-pixel crops of the embedded images, so a run takes a
few seconds, most of it importing torch and mlflow. Subprocesses run in ``tmp_path``: an
sqlite store puts its artifacts in ``./mlruns`` of the working directory.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from taskcodec.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: taskcodec, mlflow and python
TASKCODEC = str(BIN / "taskcodec")
TINY = ["--N", "8", "--M", "8", "--patch-size", "32", "--batch-size", "2",
        "--max-val-images", "1", "--max-side", "128"]
RUN_TIMEOUT_S = 180


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def blank_store(tmp_path_factory) -> Path:
    """An sqlite tracking store with MLflow's tables made: migrating a new one takes seconds."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("blank-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # the store makes its ./mlruns here
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture(autouse=True)
def migrated_store(isolated_env, blank_store):
    """Each test's own sqlite store (see conftest) starts as a copy of the blank one."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///"):
        shutil.copyfile(blank_store, uri.removeprefix("sqlite:///"))


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or os.environ["MLFLOW_TRACKING_URI"])


def steps(run_id: str, key: str, uri: str | None = None) -> list[int]:
    """The steps at which ``key`` was logged, sorted; a step logged twice appears twice."""
    return sorted(m.step for m in client(uri).get_metric_history(run_id, key))


def values(run_id: str, key: str, uri: str | None = None) -> dict[int, float]:
    return {m.step: m.value for m in client(uri).get_metric_history(run_id, key)}


def warm_up(uri: str, tmp_path: Path) -> None:
    """Make a server answer its first run, metric and upload now: a fresh server answers
    those slowly, and a training would then be over before a test can interrupt it."""
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name("warm-up")
    run = mlflow.create_run(experiment.experiment_id if experiment
                            else mlflow.create_experiment("warm-up"))
    mlflow.log_metric(run.info.run_id, "x", 1.0, step=1)
    (tmp_path / "warm-up.txt").write_text("x")
    mlflow.log_artifact(run.info.run_id, str(tmp_path / "warm-up.txt"))
    (tmp_path / "warm-up.txt").unlink()
    mlflow.set_terminated(run.info.run_id)


def taskcodec(*args: str, cwd: Path, env: dict | None = None,
              timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([TASKCODEC, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def taskcodec_here(*args: str, cwd: Path, monkeypatch) -> subprocess.CompletedProcess:
    """``taskcodec ARGS`` run in this process (no start-up cost), in ``cwd``."""
    from click.testing import CliRunner

    from taskcodec.cli.main import cli

    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(cli, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def start_taskcodec(*args: str, cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A training in the background; its stderr goes to ``log`` (read it while it runs)."""
    with open(log, "w") as err:
        return subprocess.Popen([TASKCODEC, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, text=True)


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 120,
             interval: float = 0.01):
    """Poll ``condition()`` until it is truthy; fail early if ``proc`` ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(path: Path) -> int:
    return load_checkpoint(path)["step"] if path.is_file() else 0


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_one_clean_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = error_lines(result.stderr)
    assert result.stderr.rstrip().endswith(line)  # the error is the last word
    return line


def train_in_process(tmp_path: Path, monkeypatch, **settings) -> str:
    """``engine.train`` in this process (no start-up cost); returns the run id."""
    from taskcodec.config import TrainConfig
    from taskcodec.engine import train

    base = {"N": 8, "M": 8, "patch_size": 32, "batch_size": 2, "max_val_images": 1,
            "max_side": 128, "log_every": 1}
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts in ./mlruns
    return train(TrainConfig.from_dict({**base, **settings}))


@pytest.fixture
def stop_process():
    """Kill (SIGKILL, by pid) what a test started, if it is still running at the end."""
    procs: list[subprocess.Popen] = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


# --- mlflow run of the MLProject entry points, against the session server --------------------


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_run_train_then_evaluate_logs_everything_to_the_server(mlflow_server, tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_EXPERIMENT_NAME": "test-train-e2e"}
    mlflow_bin = str(BIN / "mlflow")
    params = {"codec": "bmshj2018-factorized", "N": 8, "M": 8, "lmbda": 0.05, "patch_size": 32,
              "batch_size": 2, "epochs": 2, "epoch_length": 4, "max_steps": 0,
              "max_val_images": 1, "max_side": 128, "log_every": 1,
              "checkpoint_dir": str(tmp_path / "ckpt")}
    train = subprocess.run(
        [mlflow_bin, "run", str(ROOT), "-e", "train", "--env-manager", "local",
         *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert train.returncode == 0, train.stderr[-3000:]
    mlflow = client()
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("test-train-e2e").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"

    # All settings, the MLProject's and the extra ones, with the values given.
    from taskcodec.config import TrainConfig

    logged = run.data.params
    assert {f.name for f in TrainConfig.fields()} <= set(logged)
    assert float(logged["lmbda"]) == 0.05 and float(logged["N"]) == 8
    assert logged["epoch_length"] == "4" and logged["log_every"] == "1"

    # 2 epochs of 4 crops in batches of 2: steps 1..4, validation after each epoch.
    for key in ("loss", "bpp_loss", "mse_loss", "aux_loss", "lr"):
        assert steps(run_id, key) == [1, 2, 3, 4], key
    assert all(math.isfinite(v) and v > 0 for v in values(run_id, "loss").values())
    assert values(run_id, "lr") == {s: 1e-4 for s in (1, 2, 3, 4)}
    for key in ("val_loss", "val_bpp", "val_psnr", "val_ms_ssim", "val_mse_loss"):
        assert steps(run_id, key) == [2, 4], key
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["git_commit"] == commit
    assert run.data.tags["codec"] == "bmshj2018-factorized"

    # The checkpoints really arrived in the server's artifact folder and load safely.
    assert sorted(f.path for f in mlflow.list_artifacts(run_id, "checkpoints")) == [
        "checkpoints/best.pt", "checkpoints/last.pt"]
    on_server = {p.name: p for p in mlflow_server.artifacts.rglob("*.pt") if run_id in p.parts}
    assert set(on_server) == {"best.pt", "last.pt"}
    last = load_checkpoint(on_server["last.pt"])
    best = load_checkpoint(on_server["best.pt"])
    assert (last["step"], last["epoch"], last["run_id"]) == (4, 2, run_id)
    assert last["config"]["N"] == 8 and last["config"]["lmbda"] == 0.05
    assert {"model", "optimizer", "aux_optimizer", "lr_scheduler", "fingerprint"} <= set(last)
    assert best["step"] in (2, 4)
    assert best["best"] == min(values(run_id, "val_loss").values())

    evaluate = subprocess.run(
        [mlflow_bin, "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
         "-P", f"checkpoint={run_id}", "-P", "max_images=2", "-P", "max_side=128"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    runs = mlflow.search_runs([run.info.experiment_id], filter_string=f"run_id != '{run_id}'")
    (ev,) = runs
    assert ev.info.status == "FINISHED"
    metrics = ev.data.metrics
    for key in ("bpp", "bpp_estimated", "psnr", "ms_ssim", "encode_time", "decode_time",
                "jpeg_bpp", "jpeg_psnr", "jpeg_ms_ssim"):
        assert math.isfinite(metrics[key]), key
    assert metrics["bpp"] > 0 and metrics["encode_time"] > 0 and metrics["decode_time"] > 0
    assert 0 < metrics["ms_ssim"] <= 1 and metrics["psnr"] > 0
    assert ev.data.tags["evaluated_run_id"] == run_id
    assert ev.data.tags["checkpoint_fingerprint"] == best["fingerprint"]
    assert ev.data.tags["git_commit"] == commit
    assert sorted(f.path for f in mlflow.list_artifacts(ev.info.run_id, "evaluation")) == [
        "evaluation/per_image.csv", "evaluation/reconstructions.png"]
    csv_path = Path(mlflow.download_artifacts(ev.info.run_id, "evaluation/per_image.csv",
                                              str(tmp_path / "eval")))
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("index,height,width,num_bytes,bpp")
    assert len(rows) == 3  # header + 2 images


# --- resuming --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.server
def test_resume_after_sigkill_continues_the_same_run_without_gaps_or_repeats(
        mlflow_server, tmp_path, stop_process, monkeypatch):
    """The hard case: the tracking server hangs, so metrics and uploads are still queued in
    the process when it is killed; the local checkpoint is ahead of what MLflow has."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-train-sigkill")
    warm_up(mlflow_server.uri, tmp_path)
    ckpt_dir = tmp_path / "ckpt"
    max_steps = 40
    proc = start_taskcodec("train", *TINY, "--epochs", "1", "--epoch-length", "1000",
                           "--max-steps", str(max_steps), "--log-every", "1",
                           "--checkpoint-every", "2", "--checkpoint-dir", str(ckpt_dir),
                           cwd=tmp_path, log=tmp_path / "first.log")
    stop_process(proc)
    wait_for(lambda: (ckpt_dir / "last.pt").is_file(), "the first checkpoint", proc)
    run_id = load_checkpoint(ckpt_dir / "last.pt")["run_id"]
    wait_for(lambda: steps(run_id, "loss"), "metrics on the server", proc, interval=0.1)
    server = int((mlflow_server.dir / "server.pid").read_text())
    os.killpg(server, signal.SIGSTOP)
    try:
        hung_at = checkpoint_step(ckpt_dir / "last.pt")
        wait_for(lambda: checkpoint_step(ckpt_dir / "last.pt") >= hung_at + 6,
                 "checkpoints while the server hangs", proc)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        os.killpg(server, signal.SIGCONT)
    ckpt = load_checkpoint(ckpt_dir / "last.pt")
    assert ckpt["step"] < max_steps  # it really died mid-training
    time.sleep(1)  # let the server finish a request it had received before it hung
    assert max(steps(run_id, "loss")) < ckpt["step"]  # MLflow is behind the checkpoint
    assert client().get_run(run_id).info.status == "RUNNING"  # nobody closed it

    # Only the run id, from another folder: the run's settings and its local checkpoint
    # (newer than the uploaded one) are found again.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = taskcodec("train", "--resume", run_id, cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip() == run_id
    assert f"resuming run {run_id} at epoch 0, step {ckpt['step']}" in resumed.stderr
    assert client().get_run(run_id).info.status == "FINISHED"
    # Every step once: none repeated by the restart, none lost with the killed process.
    for key in ("loss", "bpp_loss", "mse_loss", "aux_loss", "lr"):
        assert steps(run_id, key) == list(range(1, max_steps + 1)), key
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == max_steps
    experiment = client().get_experiment_by_name("test-train-sigkill").experiment_id
    assert [r.info.run_id for r in client().search_runs([experiment])] == [run_id]  # no 2nd run
    assert not (elsewhere / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_75_and_the_run_resumes(tmp_path, stop_process):
    ckpt_dir = tmp_path / "ckpt"
    max_steps = 30
    proc = start_taskcodec("train", *TINY, "--epochs", "1", "--epoch-length", "1000",
                           "--max-steps", str(max_steps), "--log-every", "1",
                           "--checkpoint-every", "4", "--checkpoint-dir", str(ckpt_dir),
                           cwd=tmp_path, log=tmp_path / "first.log")
    stop_process(proc)
    wait_for(lambda: (ckpt_dir / "last.pt").is_file(), "the first checkpoint", proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, (tmp_path / "first.log").read_text()[-3000:]
    ckpt = load_checkpoint(ckpt_dir / "last.pt")
    stopped_at = ckpt["step"]
    assert 4 <= stopped_at < max_steps
    run_id = ckpt["run_id"]
    run = client().get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["preempted_at_step"] == str(stopped_at)
    assert steps(run_id, "loss") == list(range(1, stopped_at + 1))
    assert "SIGTERM received" in (tmp_path / "first.log").read_text()

    # Resume into a new checkpoint folder: the checkpoint comes from MLflow (uploaded on exit).
    moved = tmp_path / "moved"
    resumed = taskcodec("train", "--resume", run_id, "--checkpoint-dir", str(moved), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip() == run_id
    assert f"resuming run {run_id} at epoch 0, step {stopped_at}" in resumed.stderr
    assert client().get_run(run_id).info.status == "FINISHED"
    assert steps(run_id, "loss") == list(range(1, max_steps + 1))
    assert load_checkpoint(moved / "last.pt")["step"] == max_steps
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == stopped_at  # left alone


def test_checkpoint_upload_copies_are_removed_once_uploaded(tmp_path, monkeypatch):
    run_id = train_in_process(tmp_path, monkeypatch, epochs=1, epoch_length=8,
                              checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_file()) == [
        "best.pt", "last.pt"]
    assert [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()
            and p.parent != tmp_path / "ckpt"] == []
    assert {f.path for f in client().list_artifacts(run_id, "checkpoints")} == {
        "checkpoints/best.pt", "checkpoints/last.pt"}


# --- tracking robustness ---------------------------------------------------------------------


def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_at_start_is_one_error_naming_the_uri(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{unused_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = taskcodec_here("train", *TINY, "--max-steps", "2", cwd=tmp_path,
                            monkeypatch=monkeypatch)
    line = assert_one_clean_error(result)
    assert uri in line and "cannot reach" in line
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.server
def test_training_survives_a_tracking_server_that_goes_away_and_comes_back(
        server_script, blank_store, tmp_path, stop_process):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    shutil.copyfile(blank_store, server_dir / "mlflow.db")  # its default store: starts sooner
    start = server_script("start", "--dir", str(server_dir))
    assert start.returncode == 0, start.stderr
    uri = start.stdout.strip()
    try:
        _train_through_outage(server_script, server_dir, uri, tmp_path, stop_process)
    finally:
        server_script("stop", "--dir", str(server_dir), timeout=60)


def _train_through_outage(server_script, server_dir, uri, tmp_path, stop_process):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    warm_up(uri, tmp_path)
    ckpt_dir = tmp_path / "ckpt"
    log = tmp_path / "train.log"
    max_steps = 60
    proc = start_taskcodec("train", *TINY, "--epochs", "1", "--epoch-length", "10000",
                           "--max-steps", str(max_steps), "--log-every", "5",
                           "--checkpoint-every", "10", "--checkpoint-dir", str(ckpt_dir),
                           cwd=tmp_path, log=log, env=env)
    stop_process(proc)
    wait_for(lambda: (ckpt_dir / "last.pt").is_file(), "the first checkpoint", proc)
    run_id = load_checkpoint(ckpt_dir / "last.pt")["run_id"]
    wait_for(lambda: steps(run_id, "loss", uri), "metrics on the server", proc, interval=0.1)

    # The server goes away; training must go on (the process is paused while the server
    # stops and starts, so that the outage falls inside the training).
    os.kill(proc.pid, signal.SIGSTOP)
    stop = server_script("stop", "--dir", str(server_dir))
    assert stop.returncode == 0, stop.stderr
    down_at = checkpoint_step(ckpt_dir / "last.pt")
    os.kill(proc.pid, signal.SIGCONT)
    wait_for(lambda: "MLflow logging failed" in log.read_text(), "a logging failure", proc)
    wait_for(lambda: checkpoint_step(ckpt_dir / "last.pt") >= down_at + 10,
             "training progress while the server is away", proc)
    os.kill(proc.pid, signal.SIGSTOP)
    progressed_to = checkpoint_step(ckpt_dir / "last.pt")
    assert progressed_to < max_steps, "training ended before the server came back"
    port = str(urlsplit(uri).port)
    again = server_script("start", "--dir", str(server_dir), "--port", port)
    assert again.returncode == 0, again.stderr
    os.kill(proc.pid, signal.SIGCONT)

    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"training did not end; at step {checkpoint_step(ckpt_dir / 'last.pt')}; "
                    f"log:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert out.strip() == run_id
    run = client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert steps(run_id, "loss", uri) == list(range(5, max_steps + 1, 5))
    assert "tracking server reachable again" in log.read_text()
    on_server = [p for p in (server_dir / "artifacts").rglob("last.pt") if run_id in p.parts]
    assert len(on_server) == 1
    assert load_checkpoint(on_server[0])["step"] == max_steps
    assert not list(ckpt_dir.glob("unsent-*.json"))


# --- failures and options --------------------------------------------------------------------


def nan_checkpoint(path: Path) -> Path:
    """A checkpoint whose weights are NaN: any training started from it has a NaN loss."""

    from taskcodec.checkpoints import save_atomic
    from taskcodec.codecs import build_codec

    model = build_codec("bmshj2018-factorized", N=8, M=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if key.startswith("g_a.") and key.endswith(".weight"):
            state[key].fill_(float("nan"))
    return save_atomic({"model": state, "config": {"codec": "bmshj2018-factorized", "N": 8,
                                                   "M": 8}}, path)


def test_non_finite_loss_stops_with_one_clear_error(tmp_path, monkeypatch):
    source = nan_checkpoint(tmp_path / "nan.pt")
    result = taskcodec_here("train", *TINY, "--max-steps", "5", "--init-from", str(source),
                            "--checkpoint-dir", str(tmp_path / "ckpt"), cwd=tmp_path,
                            monkeypatch=monkeypatch)
    line = assert_one_clean_error(result)
    assert line == ("Error: loss became nan at step 1 (epoch 1); lower lr=0.0001 or lmbda=0.013, "
                    "or check the data")  # no checkpoint to point to: none was written
    assert "requires_grad" not in result.stderr
    (run,) = client().search_runs([client().get_experiment_by_name("taskcodec").experiment_id])
    assert run.info.status == "FAILED"
    assert steps(run.info.run_id, "loss") == []


@pytest.mark.slow
def test_init_from_starts_from_the_source_runs_best_weights(tmp_path, monkeypatch):
    import torch


    source = train_in_process(tmp_path, monkeypatch, epochs=3, epoch_length=8, lr=0.01,
                              checkpoint_dir=str(tmp_path / "a"))
    source_val = values(source, "val_loss")
    assert len(set(source_val.values())) == 3  # the source really trained
    best = load_checkpoint(tmp_path / "a" / "best.pt")

    # With a learning rate far below float32 resolution the weights stay the source's best,
    # so its validation loss must come out exactly the same.
    tuned = train_in_process(tmp_path, monkeypatch, epochs=1, epoch_length=4, lr=1e-12, aux_lr=1e-12,
                             init_from=source, checkpoint_dir=str(tmp_path / "b"))
    run = client().get_run(tuned)
    assert run.data.tags["init_from"] == source
    assert run.data.params["init_from"] == source
    (tuned_val,) = values(tuned, "val_loss").values()
    assert tuned_val == pytest.approx(best["best"], rel=1e-5)
    assert tuned_val == pytest.approx(min(source_val.values()), rel=1e-5)
    first_loss = values(tuned, "loss")[1]
    source_loss = values(source, "loss")
    assert abs(first_loss - source_loss[max(source_loss)]) < abs(first_loss - source_loss[1])
    tuned_weights = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for key, value in best["model"].items():  # steps of 1e-12 move only weights near zero
        assert torch.allclose(tuned_weights[key], value, rtol=1e-6, atol=1e-9), key

    with pytest.raises(ConfigError, match=r"^N=16 conflicts with init_from=.*weights have N=8"):
        train_in_process(tmp_path, monkeypatch, N=16, epochs=1, epoch_length=4, init_from=source,
                         checkpoint_dir=str(tmp_path / "c"))


def test_init_from_takes_the_architecture_from_its_source_unless_given(tmp_path, monkeypatch):
    from taskcodec.checkpoints import save_atomic
    from taskcodec.codecs import build_codec
    from taskcodec.errors import CheckpointError

    model = build_codec("bmshj2018-hyperprior", N=8, M=8)
    source = save_atomic({"model": model.state_dict(), "entry_point": "train",
                          "config": {"codec": "bmshj2018-hyperprior", "N": 8, "M": 8}},
                         tmp_path / "hyper.pt")
    # The codec is not given: it comes from the source, and the run says so in its params.
    run_id = train_in_process(tmp_path, monkeypatch, patch_size=64, max_steps=1, epochs=1,
                              epoch_length=2, init_from=str(source),
                              checkpoint_dir=str(tmp_path / "ok"))
    params = client().get_run(run_id).data.params
    assert (params["codec"], params["N"], params["M"]) == ("bmshj2018-hyperprior", "8", "8")
    assert load_checkpoint(tmp_path / "ok" / "last.pt")["model_args"]["codec"] == \
        "bmshj2018-hyperprior"
    # A value given that the weights cannot have: one line naming both, before any run exists.
    before = len(client().search_runs([client().get_experiment_by_name("taskcodec").experiment_id]))
    with pytest.raises(ConfigError, match=r"^M=16 conflicts with init_from=.*hyper.pt, whose "
                                          r"weights have M=8 \(leave M out"):
        train_in_process(tmp_path, monkeypatch, M=16, init_from=str(source))
    with pytest.raises(CheckpointError, match="is a train-base checkpoint; train cannot"):
        train_in_process(tmp_path, monkeypatch, init_from=str(save_atomic(
            {"model": {}, "entry_point": "train-base", "config": {}}, tmp_path / "base.pt")))
    after = len(client().search_runs([client().get_experiment_by_name("taskcodec").experiment_id]))
    assert after == before


def test_cheng2020_says_M_is_N_in_its_params_checkpoint_and_logged_model(tmp_path, monkeypatch):
    """cheng2020-* are sized by N alone: M is N wherever the architecture is written down, also
    for a run started from a checkpoint that still carries M's default (192)."""
    from taskcodec.checkpoints import save_atomic
    from taskcodec.codecs import build_codec
    from taskcodec.config import TrainConfig
    from taskcodec.model_registry import MODEL_ID_TAG

    config = TrainConfig.from_dict({"codec": "cheng2020-anchor", "N": 16})
    assert (config.M, config.to_params()["M"]) == (16, "16")
    assert TrainConfig.from_dict(config.to_dict()) == config
    source = save_atomic({"model": build_codec("cheng2020-anchor", N=8, M=8).state_dict(),
                          "entry_point": "train",
                          "config": {"codec": "cheng2020-anchor", "N": 8, "M": 192}},
                         tmp_path / "cheng.pt")
    # N is not given: it comes from the source; M follows it.
    run_id = train_in_process(tmp_path, monkeypatch, codec="cheng2020-anchor", N=128, M=192,
                              patch_size=64, max_steps=1, epochs=1, epoch_length=2,
                              init_from=str(source), checkpoint_dir=str(tmp_path / "ckpt"))
    run = client().get_run(run_id)
    assert (run.data.params["N"], run.data.params["M"]) == ("8", "8")
    last = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert (last["config"]["M"], last["model_args"]["M"]) == (8, 8)
    model = client().get_logged_model(run.data.tags[MODEL_ID_TAG])
    assert (model.params["N"], model.params["M"]) == ("8", "8")


def test_early_stopping_ends_training_before_the_last_epoch(tmp_path, monkeypatch):
    # The weights cannot change at this learning rate, so validation never improves.
    run_id = train_in_process(tmp_path, monkeypatch, epochs=20, epoch_length=4, lr=1e-12, aux_lr=1e-12,
                              early_stop_patience=2, checkpoint_dir=str(tmp_path / "ckpt"))
    assert client().get_run(run_id).info.status == "FINISHED"
    # 2 steps per epoch: the first validation sets the best, two more without improvement.
    assert steps(run_id, "val_loss") == [2, 4, 6]
    assert steps(run_id, "loss") == list(range(1, 7))
    last = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert (last["epoch"], last["step"], last["bad_validations"]) == (3, 6, 2)


def test_resume_of_a_finished_run_is_a_no_op_and_a_larger_budget_is_recorded(tmp_path, monkeypatch, caplog):
    ckpt_dir = str(tmp_path / "ckpt")
    run_id = train_in_process(tmp_path, monkeypatch, epochs=50, epoch_length=4, max_steps=4,
                              checkpoint_dir=ckpt_dir)
    assert steps(run_id, "loss") == [1, 2, 3, 4]
    for _ in range(2):  # a requeue after completion, twice: no step more
        assert train_in_process(tmp_path, monkeypatch, epochs=50, epoch_length=4, max_steps=4,
                                resume=run_id) == run_id
    assert steps(run_id, "loss") == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["step"] == 4
    assert f"run {run_id} is already complete (step 4 of max_steps=4)" in caplog.text
    assert "resumed.max_steps" not in client().get_run(run_id).data.tags

    train_in_process(tmp_path, monkeypatch, epochs=50, epoch_length=4, max_steps=6, resume=run_id)
    assert steps(run_id, "loss") == [1, 2, 3, 4, 5, 6]
    run = client().get_run(run_id)
    assert run.data.params["max_steps"] == "4"  # MLflow params cannot change ...
    assert run.data.tags["resumed.max_steps"] == "6"  # ... so the new budget is a tag
    assert run.info.status == "FINISHED"


def test_resume_refuses_a_setting_the_run_cannot_change(tmp_path, monkeypatch):
    from taskcodec.errors import ConfigError

    run_id = train_in_process(tmp_path, monkeypatch, epochs=50, epoch_length=4, max_steps=2,
                              checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError) as err:
        train_in_process(tmp_path, monkeypatch, epochs=50, epoch_length=4, max_steps=4,
                         lmbda=0.5, resume=run_id)
    assert str(err.value) == (
        f"lmbda=0.5 conflicts with run {run_id}, which was trained with lmbda=0.013: a resumed run "
        "keeps its settings (only epochs, max_steps, num_workers, device, log_every, checkpoint_every, "
        "early_stop_patience, checkpoint_dir, max_minutes, compile, channels_last, precision, "
        f"tf32, rd_every, rd_images, cache_mb may change); to train with lmbda=0.5, start a new run "
        f"with --init-from {run_id}")
    assert steps(run_id, "loss") == [1, 2]  # nothing trained
    assert client().get_run(run_id).info.status == "FINISHED"  # and the run was not reopened


def test_rd_while_training_equals_evaluate_of_the_same_checkpoint(tmp_path, monkeypatch):
    from taskcodec.config import EvalConfig
    from taskcodec.evaluate import evaluate

    ckpt = tmp_path / "ckpt"
    # The short-cpu recipe (warm-up schedule, rd_every=1) on a tiny codec.
    run_id = train_in_process(tmp_path, monkeypatch, recipe="short-cpu", patch_size=32,
                              batch_size=2, epoch_length=4, epochs=1, warmup_steps=1,
                              rd_images=2, checkpoint_dir=str(ckpt))
    assert steps(run_id, "test_bpp") == [2]
    metrics = client().get_run(run_id).data.metrics
    result = evaluate(EvalConfig(checkpoint=str(ckpt / "last.pt"), which="last", max_images=2,
                                 max_side=128, jpeg=False))
    summary = result["summary"]
    assert metrics["test_bpp"] == pytest.approx(summary["bpp"], rel=1e-9)
    assert metrics["test_psnr"] == pytest.approx(summary["psnr"], rel=1e-6)
    assert metrics["test_bpp_gap"] == pytest.approx(summary["bpp"] - summary["bpp_estimated"],
                                                    abs=1e-6)
    assert math.isfinite(metrics["test_rd_seconds"])
    assert client().get_run(run_id).data.params["lr_scheduler"] == "warmup-cosine"
