"""The training image (docker/Dockerfile, scripts/build-image).

Fast, always: the Dockerfile passes hadolint; the image tag is VERSION-COMMIT.

Slow (marker ``image``; several minutes the first time: debootstrap, then a 7 GB layer with
torch): the image is built for real with podman (or docker) and the command that k8s-launch puts
in a Job runs in it, logging to a real MLflow server on the host. It trains and finishes a
run; and a run stopped by SIGTERM (what Kubernetes sends a preempted pod) exits 75 with a
checkpoint on the volume, and the retried container resumes the same run from it.

When the slow test runs: with TASKCODEC_IMAGE_TEST=1 (``make image-test``), never with
TASKCODEC_IMAGE_TEST=0, and otherwise when an input of the image changed in the last commit or
in the work tree (see IMAGE_INPUTS), so CI builds the image exactly when it may have changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from taskcodec.launch import k8s, runs
from taskcodec.launch.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build-image"
HADOLINT = Path(sys.executable).parent / "hadolint"
IMAGE_INPUTS = ("docker", "poetry.lock", ".dockerignore", "scripts/build-image",
                "scripts/install-from-lock.py")
BUILD_TIMEOUT_S = 3600
# What podman needs to run containers on the machines we develop on (see shared notes).
RUN_FLAGS = ["--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(HADOLINT), str(ROOT / "docker" / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_a_rubber_stamp(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_image_tag_is_version_and_commit():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    tag = subprocess.run([str(BUILD), "tag"], capture_output=True, text=True, check=True,
                         timeout=60).stdout.strip()
    assert re.fullmatch(rf"taskcodec:{re.escape(version)}-([0-9a-f]{{12}}(-dirty)?|nogit)", tag), tag


# -- the real image ----------------------------------------------------------------------------

def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=60)


def changed_image_inputs() -> list[str]:
    """Image inputs changed by the last commit, or changed/new in the work tree."""
    last = _git("diff", "--name-only", "HEAD~1", "HEAD", "--", *IMAGE_INPUTS)
    if last.returncode != 0:  # no previous commit (or no git): everything is new
        last = _git("ls-files", "--", *IMAGE_INPUTS)
    work = _git("diff", "--name-only", "HEAD", "--", *IMAGE_INPUTS)
    new = _git("ls-files", "--others", "--exclude-standard", "--", *IMAGE_INPUTS)
    names = set()
    for result in (last, work, new):
        if result.returncode == 0:
            names.update(line for line in result.stdout.splitlines() if line)
    return sorted(names)


def image_test_wanted() -> tuple[bool, bool, str]:
    """(run it?, required?, why)."""
    flag = os.environ.get("TASKCODEC_IMAGE_TEST", "")
    if flag == "1":
        return True, True, "TASKCODEC_IMAGE_TEST=1"
    if flag == "0":
        return False, False, "TASKCODEC_IMAGE_TEST=0"
    changed = changed_image_inputs()
    if changed:
        return True, False, f"image inputs changed: {', '.join(changed)}"
    return False, False, ("no image input changed in the last commit or the work tree "
                          "(make image-test builds it anyway)")


WANTED, REQUIRED, WHY = image_test_wanted()
# Decided at collection, so that a skipped test starts no MLflow server either.
needs_image = pytest.mark.skipif(not WANTED, reason=WHY)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The training image, built with scripts/build-image: (engine, reference)."""
    required, why = REQUIRED, WHY
    engine = subprocess.run([str(BUILD), "engine"], capture_output=True, text=True, timeout=60)
    if engine.returncode != 0:
        message = f"no container engine: {engine.stderr.strip()} (run scripts/image-deps)"
        if required:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    log = tmp_path_factory.mktemp("image-build") / "build.log"
    start = time.monotonic()
    with log.open("w") as fh:
        build = subprocess.run([str(BUILD), "build"], stdout=subprocess.PIPE, stderr=fh,
                               text=True, timeout=BUILD_TIMEOUT_S)
    if build.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        pytest.fail(f"scripts/build-image build failed ({why}):\n{tail}", pytrace=False)
    print(f"\nimage built in {time.monotonic() - start:.0f} s ({why})", file=sys.stderr)
    return engine.stdout.strip(), build.stdout.strip().splitlines()[-1]


def _job_container(image_ref: str, tracking_uri: str, params: dict[str, str], name: str,
                   gpus: int = 0) -> tuple[str, dict]:
    """Create the MLflow run as k8s-launch does and render its Job; returns (run id, container)."""
    spec = JobSpec(entry_point="train", params=params, tracking_uri=tracking_uri,
                   experiment="image-test", image=image_ref, gpus=gpus)
    opts = k8s.K8sOptions(job_name=name, volume_claim="data")
    k8s.validate(spec, opts)
    (run_id,) = runs.create_runs(spec, launcher="k8s", base_name=name, tags={}).run_ids
    (job,) = k8s.render_jobs(spec, opts, [run_id])
    return run_id, job["spec"]["template"]["spec"]["containers"][0]


def _run_argv(engine: str, image_ref: str, container: dict, volume: Path, pod: str) -> list[str]:
    """`podman run` of the Job's container: its args after the image's ENTRYPOINT, its env,
    the volume; the pod name stands in for the downward API."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["TASKCODEC_K8S_POD"] = pod
    argv = [engine, "run", "--rm", "--name", pod, *RUN_FLAGS,
            "-v", f"{volume}:{container['volumeMounts'][-1]['mountPath']}"]
    for name, value in env.items():
        argv += ["-e", f"{name}={value}"]
    return [*argv, image_ref, *container["args"]]


def _volume(tmp_path: Path) -> Path:
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chown(volume, 1000, 1000)  # the image's user; on a cluster, the pod's fsGroup does this
    return volume


SMALL = {"N": "16", "M": "16", "patch_size": "64", "batch_size": "2", "max_side": "128",
         "max_val_images": "1", "log_every": "1"}


@pytest.mark.image
@pytest.mark.server
@needs_image
def test_job_command_trains_in_the_image_and_logs_to_mlflow(image, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    engine, ref = image
    run_id, container = _job_container(ref, mlflow_server.uri, {**SMALL, "max_steps": "4"},
                                       "image-test-finish")
    pod = f"image-test-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(_run_argv(engine, ref, container, _volume(tmp_path), pod),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.params["max_steps"]) == 4
    assert {"loss", "val_psnr"} <= set(run.data.metrics)
    assert run.data.tags["k8s_job"] == "image-test-finish"
    assert run.data.tags["k8s_pod"] == pod
    assert run.data.tags["image"] == ref
    assert (tmp_path / "volume" / "checkpoints" / run_id / "last.pt").is_file()


@pytest.mark.image
@pytest.mark.server
@needs_image
def test_multi_gpu_command_trains_one_run_with_torchrun(image, mlflow_server, tmp_path):
    """The --gpus 2 command (torchrun, two processes; gloo on this CPU machine): one run, each
    step logged once, by rank 0."""
    from mlflow.tracking import MlflowClient

    engine, ref = image
    run_id, container = _job_container(ref, mlflow_server.uri,
                                       {**SMALL, "max_steps": "6", "device": "cpu"},
                                       "image-test-torchrun", gpus=2)
    assert container["args"][0] == "torchrun"
    pod = f"image-test-torchrun-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(_run_argv(engine, ref, container, _volume(tmp_path), pod),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the container ended (status {proc.returncode}) before {what}:"
                                 f"\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


@pytest.mark.image
@pytest.mark.server
@needs_image
def test_sigterm_checkpoints_and_the_retried_container_resumes_the_run(image, mlflow_server,
                                                                       tmp_path):
    """What a preempted pod goes through: SIGTERM to PID 1 -> checkpoint on the volume and
    exit 75 -> the Job starts the same command again -> it resumes the same MLflow run."""
    from mlflow.tracking import MlflowClient

    engine, ref = image
    client = MlflowClient(mlflow_server.uri)
    run_id, container = _job_container(ref, mlflow_server.uri,
                                       {**SMALL, "max_steps": "100000", "checkpoint_every": "5"},
                                       "image-test-preempt")
    volume = _volume(tmp_path)
    last = volume / "checkpoints" / run_id / "last.pt"
    stopped_at = []
    for attempt in range(2):
        pod = f"image-test-preempt-{attempt}-{uuid.uuid4().hex[:6]}"
        proc = subprocess.Popen(_run_argv(engine, ref, container, volume, pod),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if attempt == 0:
                _wait_for(last.is_file, 600, "the first checkpoint", proc)
            else:
                def resumed_and_stepped() -> bool:
                    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
                    return bool(steps) and max(steps) > stopped_at[0] + 2
                _wait_for(resumed_and_stepped, 600, "training to go on after the resume", proc)
            subprocess.run([engine, "kill", "--signal", "TERM", pod], check=True, timeout=60,
                           capture_output=True)
            assert proc.wait(timeout=300) == 75
            log = proc.stderr.read()
        finally:
            if proc.poll() is None:
                subprocess.run([engine, "kill", pod], capture_output=True, timeout=60)
                proc.wait(timeout=60)
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        stopped_at.append(int(run.data.tags["preempted_at_step"]))
        if attempt == 1:
            assert f"resuming run {run_id}" in log
    assert stopped_at[1] > stopped_at[0]
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert len(steps) == len(set(steps)), "a resumed run logged some steps twice"
    assert min(steps) == 1 and max(steps) >= stopped_at[1]


def test_sif_without_apptainer_says_what_to_do():
    if shutil.which("apptainer") or shutil.which("singularity"):
        pytest.skip("apptainer is installed: `make sif` would really convert")
    result = subprocess.run([str(BUILD), "sif"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "neither apptainer nor singularity is installed" in result.stderr
    assert "apptainer build taskcodec.sif docker-archive://" in result.stderr
