"""The slurm launchers against a real single-node Slurm (scripts/slurm-test-cluster), a real
MLflow server and, for the SSH path, a real sshd on 127.0.0.1.

Jobs really train a tiny codec on the CPU (the node advertises two fake GPUs; the sweep asks for
one each). The console scripts are run as subprocesses, as a user would. Slurm's delay before a
requeued job may start again is cut from 120 s to 10 s by the test cluster (cred_expire=10).
Needs root and the Debian packages slurm-wlm, munge and openssh-server (scripts/system-deps);
without them these tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.server]

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm-test-cluster"
BIN = Path(sys.executable).parent
TINY = ["-P", "N=8", "-P", "M=8", "-P", "patch_size=32", "-P", "batch_size=2",
        "-P", "max_val_images=1", "-P", "max_side=128", "-P", "log_every=1",
        "--cpus", "1", "--mem", "1G", "--venv", sys.prefix, "-e", "OMP_NUM_THREADS=1"]
JOB_TIMEOUT_S = 240


def _missing_tools() -> list[str]:
    tools = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel"]
    return [t for t in tools if not (shutil.which(t) or Path("/usr/sbin", t).exists())]


@pytest.fixture(scope="session")
def slurm_conf(tmp_path_factory) -> str:
    """A real single-node cluster for the session, stopped at the end; yields SLURM_CONF."""
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root (its daemons run as root)")
    missing = _missing_tools()
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): run scripts/system-deps "
                    "as root")
    directory = tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run([str(CLUSTER_SCRIPT), "start", str(directory)], capture_output=True,
                                 text=True, timeout=120)
        if started.returncode != 0:
            pytest.fail(f"slurm-test-cluster start failed:\n{started.stderr}", pytrace=False)
        assert started.stdout.startswith("export SLURM_CONF=")
        yield str(directory / "slurm.conf")
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", str(directory)], capture_output=True,
                       timeout=120)


@pytest.fixture
def cluster_env(slurm_conf, mlflow_server, monkeypatch, tmp_path):
    """SLURM_CONF for the clients, the MLflow server, no defaults files of the developer."""
    monkeypatch.setenv("SLURM_CONF", slurm_conf)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"slurm-{tmp_path.name}")
    monkeypatch.chdir(tmp_path)
    return mlflow_server


def cli(name: str, *args: str, input: str | None = None, check: bool = True,
        timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / name), *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env=os.environ)
    if check:
        assert done.returncode == 0, f"{name} {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


def launched(out: str) -> list[tuple[str, str, str]]:
    """slurm-launch's stdout: one (JOB_TASK, RUN_ID, LINK) per array task."""
    rows = [tuple(line.split()) for line in out.splitlines() if line.strip()]
    assert rows and all(len(r) == 3 for r in rows), out
    return rows  # type: ignore[return-value]


def squeue_ids(job: str) -> list[str]:
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True,
                          text=True, timeout=30)
    return done.stdout.split("\n") if done.returncode == 0 and done.stdout.strip() else []


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def loss_steps(uri: str, run_id: str) -> list[int]:
    return [m.step for m in client(uri).get_metric_history(run_id, "loss")]


def test_sweep_tasks_train_as_tagged_mlflow_runs(cluster_env, tmp_path):
    logs = tmp_path / "logs"
    out = cli("slurm-launch", "train", "--sweep", "lmbda=0.01,0.02", *TINY, "-P", "max_steps=3",
              "--gpus", "1", "--output-dir", str(logs), "--name", "sweep").stdout
    rows = launched(out)
    job = rows[0][0].split("_")[0]
    assert [r[0] for r in rows] == [f"{job}_0", f"{job}_1"]
    assert all(r[2].startswith(f"{cluster_env.uri}/#/experiments/") and r[2].endswith(r[1])
               for r in rows)

    status = cli("slurm-status", "--run-ids").stdout
    for task, run_id, _ in rows:
        line = next((l for l in status.splitlines() if l.startswith(task + " ")), "")
        assert run_id in line and "sweep" in line, status

    wait_until(lambda: not squeue_ids(job), JOB_TIMEOUT_S, f"array job {job} to finish")
    mlflow = client(cluster_env.uri)
    for index, (task, run_id, _) in enumerate(rows):
        run = mlflow.get_run(run_id)
        assert run.info.status == "FINISHED", f"{task}: {run.info.status}"
        tags = run.data.tags
        assert tags["slurm_array_job_id"] == job and tags["slurm_array_task_id"] == str(index)
        assert tags["slurm_job_id"].isdigit() and tags["slurm_nodelist"] == socket.gethostname()
        assert tags["slurm_job"] == task and tags["launcher"] == "slurm"
        assert run.data.params["lmbda"] == ["0.01", "0.02"][index]
        assert loss_steps(cluster_env.uri, run_id) == [1, 2, 3]
        artifacts = {a.path for a in mlflow.list_artifacts(run_id, "slurm")}
        assert artifacts == {"slurm/job.sh"}
        assert {a.path for a in mlflow.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/last.pt"}

    log = cli("slurm-log", job).stdout
    for task, run_id, _ in rows:
        assert f"==> {logs}/sweep-{task}.out <==" in log
        assert f"run {run_id} on {socket.gethostname()}" in log
    one = cli("slurm-log", rows[1][0], "--output-dir", str(logs)).stdout
    assert rows[1][1] in one and rows[0][1] not in one
    # The helpers on a finished job: -f prints the log and returns (it used to follow the file
    # for ever), a cancel says the job had already finished (it used to say "cancelled").
    followed = cli("slurm-log", rows[0][0], "-f", timeout=60).stdout
    assert f"run {rows[0][1]} on" in followed
    late = cli("slurm-cancel", job, "--yes")
    assert late.stderr.strip() == f"{job} had already finished: nothing to cancel"


def test_requeued_job_resumes_its_run_without_losing_or_repeating_steps(cluster_env, tmp_path):
    """First Slurm's time-limit warning (SIGUSR1 to the batch shell: the job requeues itself),
    then an external `scontrol requeue`: one MLflow run, steps 1..N each logged once."""
    steps = 300
    out = cli("slurm-launch", "train", *TINY, "-P", f"max_steps={steps}", "--name", "requeue",
              "-e", "TASKCODEC_METRICS_INTERVAL=0",  # every step's loss at once: signal early
              "--output-dir", str(tmp_path / "logs")).stdout
    ((task, run_id, _),) = launched(out)
    uri = cluster_env.uri

    def logged_beyond(n):
        return lambda: (s := loss_steps(uri, run_id)) and max(s) > n and s

    first = max(wait_until(logged_beyond(15), JOB_TIMEOUT_S, "training to start"))
    subprocess.run(["scancel", "--batch", "--signal=USR1", task], check=True)  # as at time limit
    wait_until(lambda: client(uri).get_run(run_id).data.tags.get("preempted_at_step"),
               60, "a checkpoint on SIGUSR1")
    second = max(wait_until(logged_beyond(first + 40), JOB_TIMEOUT_S, "the requeued job to train"))
    subprocess.run(["scontrol", "requeue", task], check=True)
    wait_until(lambda: client(uri).get_run(run_id).info.status == "FINISHED" and
               not squeue_ids(task.split("_")[0]), JOB_TIMEOUT_S + 60, "the run to finish")

    assert loss_steps(uri, run_id) == list(range(1, steps + 1))
    assert second > first
    log = (tmp_path / "logs" / f"requeue-{task}.out").read_text()
    assert log.count(f"run {run_id} on") == 3, log[-3000:]
    assert "taskcodec: time limit near: requeueing job" in log
    assert "DUE TO JOB REQUEUE" in log
    assert log.count("resuming run") == 2


def test_cancel_asks_then_cancels_a_running_job(cluster_env, tmp_path):
    from taskcodec.launch.slurm import Cluster, make_comment

    job = Cluster().submit(f"#!/bin/bash\n#SBATCH --output={tmp_path}/%j.out\nsleep 300\n",
                           env={}, comment=make_comment(["r0"], [""]))
    wait_until(lambda: any("RUNNING" in l for l in squeue_ids(job)), 60, f"job {job} to run")
    assert job in cli("slurm-status").stdout

    refused = cli("slurm-cancel", job, input="n\n", check=False)
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    assert any("RUNNING" in l for l in squeue_ids(job))

    cli("slurm-cancel", job, input="y\n")
    wait_until(lambda: not any("RUNNING" in l for l in squeue_ids(job)), 30, "the cancel")


# -- the SSH path -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def login_node(slurm_conf, tmp_path):
    """A real sshd on 127.0.0.1 in front of the test cluster, with a key made for this test;
    yields an ssh config file whose host ``slurm-login`` reaches it."""
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh"):
        pytest.skip("openssh-server/openssh-client not installed: run scripts/system-deps as root")
    d = tmp_path / "ssh"
    home = tmp_path / "login-home"
    d.mkdir()
    home.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPasswordAuthentication no\nPidFile {d}/sshd.pid\n"
        # The login node's own Slurm configuration, as a cluster's profile would set it.
        f"SetEnv SLURM_CONF={slurm_conf} HOME={home}\n")
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config"),
                             "-E", str(d / "sshd.log")])
    config = d / "ssh_config"
    config.write_text(
        f"Host slurm-login\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
        f"  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
    try:
        wait_until(lambda: subprocess.run(["ssh", "-F", str(config), "slurm-login", "true"],
                                          capture_output=True).returncode == 0, 20, "sshd")
        yield config, home
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)


def test_launch_watch_and_cancel_over_ssh(cluster_env, login_node, tmp_path, monkeypatch):
    config, home = login_node
    # A token in the laptop's environment is copied to a 0600 file on the login node, not
    # into the script (the tracking server here ignores it).
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-not-in-any-script")
    remote = ["--host", "slurm-login", "--ssh-config", str(config)]
    logs = tmp_path / "remote-logs"
    done = cli("slurm-launch", "train", *remote, *TINY, "-P", "max_steps=5000", "--name", "viassh",
               "--project-dir", str(ROOT), "--output-dir", str(logs))
    ((task, run_id, _),) = launched(done.stdout)
    job = task.split("_")[0]
    creds = home / ".config" / "taskcodec" / "credentials.env"
    assert f"slurm-login:{creds}" in done.stderr
    assert (creds.stat().st_mode & 0o777) == 0o600
    assert creds.read_text() == "MLFLOW_TRACKING_TOKEN=tok-not-in-any-script\n"
    run = client(cluster_env.uri).get_run(run_id)
    assert run.data.tags["slurm_host"] == "slurm-login"

    wait_until(lambda: loss_steps(cluster_env.uri, run_id), JOB_TIMEOUT_S, "training over SSH")
    status = cli("slurm-status", *remote).stdout
    assert any(l.startswith(f"{task} ") and "RUNNING" in l and run_id in l
               for l in status.splitlines()), status
    log = cli("slurm-log", *remote, task).stdout
    assert f"run {run_id} on" in log and "tok-not-in-any-script" not in log

    cli("slurm-cancel", *remote, "--all", "--yes")
    wait_until(lambda: not squeue_ids(job), 60, "the cancelled job to leave the queue")
    final = client(cluster_env.uri).get_run(run_id)
    # Training checkpointed on SIGTERM and ended its run KILLED; mlflow 3.17's `mlflow run` then
    # overwrites that with FAILED (it compares the status string with integer codes).
    assert final.info.status in ("KILLED", "FAILED")
    assert int(final.data.tags["preempted_at_step"]) >= 1
    script = client(cluster_env.uri).download_artifacts(run_id, "slurm/job.sh", str(tmp_path))
    assert "tok-not-in-any-script" not in Path(script).read_text()
