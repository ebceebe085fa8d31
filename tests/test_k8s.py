"""The Kubernetes launcher: rendered Jobs (golden files, validated against the Kubernetes OpenAPI
schemas), refusal of bad input before anything is sent, and the submit/status/log/cancel path.

No real API server can run here. The cluster in these tests is ``kmock.KubernetesEmulator`` on
127.0.0.1: a STAND-IN for a Kubernetes API server that stores objects and answers the REST API,
driven by the official ``kubernetes`` client through a kubeconfig file, exactly as against a
real cluster. It runs no controllers, so the tests play the Job controller themselves (they
create the pods and set the Job status). Schema validity is checked separately with
``kubernetes-validate --strict``, the runtime behaviour of the pod command in tests/test_image.py.

Golden files: tests/golden/k8s-*.yaml; regenerate with TASKCODEC_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from click.testing import CliRunner

from taskcodec.cli import k8s as cli
from taskcodec.errors import ConfigError
from taskcodec.launch import k8s
from taskcodec.launch.checks import is_credential_name
from taskcodec.launch.spec import JobSpec

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parent.parent
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
TRACKING = "http://mlflow.mlflow.svc.cluster.local:5000"
RUN_IDS = [f"{i:x}" * 32 for i in range(10, 16)]  # stand-ins for 32-hex MLflow run ids


def _case(name: str) -> tuple[JobSpec, k8s.K8sOptions]:
    """The launches that the golden files record."""
    spec = JobSpec(entry_point="train", params={"lmbda": "0.0067"}, tracking_uri=TRACKING,
                   experiment="taskcodec", image="registry.example.org/lab/taskcodec:0.1.0-abc")
    opts = k8s.K8sOptions(job_name=f"taskcodec-train-{name}", namespace="ml")
    if name == "plain":
        pass
    elif name == "gpu":
        spec = replace(spec, gpus=1, gpu_type="NVIDIA-A100-SXM4-80GB", cpus=6, memory="24Gi",
                       time="1-00:00:00", env={"MLFLOW_TRACKING_USERNAME": "alice"})
        opts = replace(opts, cpu_limit="8", memory_limit="32Gi", shm_size="8Gi",
                       node_selector={"topology.kubernetes.io/zone": "lab-a"},
                       tolerations=[k8s.parse_toleration("dedicated=ml:NoSchedule")],
                       secret_env={"MLFLOW_TRACKING_PASSWORD": "mlflow-auth:password"},
                       image_pull_secret="lab-registry", image_pull_policy="Always")
    elif name == "multigpu":
        spec = replace(spec, gpus=4, memory="64Gi")
        opts = replace(opts, volume_claim="taskcodec-data", shm_size="16Gi")
    elif name == "sweep":
        spec = replace(spec, params={"epochs": "200"}, gpus=1,
                       sweep={"lmbda": ["0.0018", "0.0067", "0.013"],
                              "codec": ["bmshj2018-factorized", "mbt2018-mean"]})
        opts = replace(opts, parallelism=2, backoff_limit=2)
    elif name == "volume":
        spec = replace(spec, params={"data": "/data/clic"}, sweep={"lmbda": ["0.0067", "0.013"]},
                       gpus=1, memory="16Gi")
        opts = replace(opts, volume_claim="taskcodec-data", mount_path="/data",
                       sweep_mode="jobs", ttl="12h")
    else:
        raise KeyError(name)
    return spec, opts


CASES = ["plain", "gpu", "multigpu", "sweep", "volume"]


def _render(name: str) -> list[dict]:
    spec, opts = _case(name)
    k8s.validate(spec, opts)
    return k8s.render_jobs(spec, opts, RUN_IDS[:len(spec.combinations())])


@pytest.mark.parametrize("name", CASES)
def test_manifest_matches_golden(name):
    text = k8s.to_yaml(_render(name))
    path = GOLDEN / f"k8s-{name}.yaml"
    if os.environ.get("TASKCODEC_REGEN_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no golden file {path}; run with TASKCODEC_REGEN_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("version", ["1.29", "1.37"])  # oldest supported (backoffLimitPerIndex), newest
def test_golden_manifests_validate_strictly_against_kubernetes_schemas(version):
    files = [str(GOLDEN / f"k8s-{name}.yaml") for name in CASES]
    result = subprocess.run([str(VALIDATE), "--strict", "-k", version, *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(f"against version {version}") == 6  # the volume case is two Jobs


def test_strict_validation_catches_a_bad_manifest(tmp_path):
    """The validator is not a rubber stamp: a misspelt field fails."""
    job = _render("plain")[0]
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {}}
    path = tmp_path / "bad.yaml"
    path.write_text(k8s.to_yaml([job]))
    result = subprocess.run([str(VALIDATE), "--strict", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "resource" in result.stdout + result.stderr


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_plain_job_runs_mlflow_run_of_the_image_project_with_its_run_id():
    job = _render("plain")[0]
    args = _container(job)["args"]
    assert args[:4] == ["python", "-m", "taskcodec.launch.mlflow_run", "/opt/taskcodec"]
    assert args[args.index("--run-id") + 1] == RUN_IDS[0]
    assert args[args.index("-e") + 1] == "train"
    assert "lmbda=0.0067" in args
    assert job["metadata"]["labels"][k8s.LABEL_RUN_ID] == RUN_IDS[0]
    assert json.loads(job["metadata"]["annotations"][k8s.ANN_RUN_IDS]) == [RUN_IDS[0]]
    env = {e["name"]: e for e in _container(job)["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == TRACKING
    assert env["TASKCODEC_K8S_POD"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["TASKCODEC_K8S_JOB"]["value"] == job["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_gpu_job_limits_gpus_and_keeps_credentials_in_secrets():
    job = _render("gpu")[0]
    c = _container(job)
    assert c["resources"] == {"requests": {"cpu": "6", "memory": "24Gi"},
                              "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}}
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"topology.kubernetes.io/zone": "lab-a",
                                   k8s.GPU_PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod["tolerations"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_PASSWORD"] == {
        "name": "MLFLOW_TRACKING_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "password"}}}
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


@pytest.mark.parametrize("name", CASES)
def test_no_credential_is_ever_written_into_a_manifest(name):
    for job in _render(name):
        for var in _container(job)["env"]:
            if is_credential_name(var["name"]):
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
        assert "password" not in k8s.to_yaml([job]).lower().replace("mlflow_tracking_password",
                                                                     "").replace("key: password", "")


def test_multi_gpu_runs_mlflow_run_under_torchrun_and_checkpoints_on_the_volume():
    job = _render("multigpu")[0]
    args = _container(job)["args"]
    assert args[:6] == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4",
                        "--no-python", "python"]
    assert args[6:9] == ["-m", "taskcodec.launch.mlflow_run", "/opt/taskcodec"]
    assert args[args.index("--run-id") + 1] == RUN_IDS[0]
    assert f"checkpoint_dir=/mnt/taskcodec/checkpoints/{RUN_IDS[0]}" in args
    mounts = _container(job)["volumeMounts"]
    assert {"name": "data", "mountPath": "/mnt/taskcodec"} in mounts
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "taskcodec-data"}} \
        in job["spec"]["template"]["spec"]["volumes"]


def test_sweep_is_an_indexed_job_whose_script_maps_each_index_to_its_run(tmp_path):
    spec, _ = _case("sweep")
    job = _render("sweep")[0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 6 and job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimitPerIndex"] == 2 and "backoffLimit" not in job["spec"]
    args = _container(job)["args"]
    assert args[:2] == ["/bin/sh", "-c"]
    # Run the script with a stand-in "python" that prints its arguments: index i runs
    # combination i with run id i; an unknown index fails.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    (fake / "python").chmod(0o755)
    combos = spec.combinations()
    for index, combo in enumerate(combos):
        out = subprocess.run(["/bin/sh", "-c", args[2]], capture_output=True, text=True,
                             env={"PATH": f"{fake}:/usr/bin:/bin",
                                  "JOB_COMPLETION_INDEX": str(index)}, check=True).stdout.split("\n")
        assert out[out.index("--run-id") + 1] == RUN_IDS[index]
        assert f"lmbda={combo['lmbda']}" in out and f"codec={combo['codec']}" in out
        assert "epochs=200" in out
    bad = subprocess.run(["/bin/sh", "-c", args[2]], capture_output=True, text=True,
                         env={"PATH": f"{fake}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": "6"})
    assert bad.returncode == 2 and "no command for completion index 6" in bad.stderr
    assert json.loads(job["metadata"]["annotations"][k8s.ANN_PARAMS]) == combos
    assert k8s.LABEL_RUN_ID not in job["metadata"]["labels"]  # one label cannot hold six runs


def test_sweep_as_one_job_per_combination():
    jobs = _render("volume")
    assert [j["metadata"]["name"] for j in jobs] == ["taskcodec-train-volume-0",
                                                     "taskcodec-train-volume-1"]
    for index, job in enumerate(jobs):
        assert job["metadata"]["labels"][k8s.LABEL_LAUNCH] == "taskcodec-train-volume"
        assert job["metadata"]["labels"][k8s.LABEL_RUN_ID] == RUN_IDS[index]
        args = _container(job)["args"]
        assert f"checkpoint_dir=/data/checkpoints/{RUN_IDS[index]}" in args
        assert job["spec"]["ttlSecondsAfterFinished"] == 12 * 3600


def test_preempted_pods_are_retried_without_spending_the_backoff_limit():
    rules = _render("plain")[0]["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                     "status": "True"}]} in rules
    exit_rule = next(r for r in rules if "onExitCodes" in r)
    assert exit_rule["onExitCodes"]["values"] == [75] and exit_rule["action"] == "Ignore"


@pytest.mark.parametrize("text, expected", [
    ("16Gi", 16 * 2 ** 30), ("512Mi", 512 * 2 ** 20), ("8G", 8 * 10 ** 9), ("500m", 0.5),
    ("2", 2), ("1.5", 1.5), ("1e3", 1000), ("100k", 100_000)])
def test_quantities(text, expected):
    assert k8s.parse_quantity(text, "--memory") == pytest.approx(expected)


@pytest.mark.parametrize("text, seconds", [
    ("12h", 43200), ("2d", 172800), ("90m", 5400), ("1h30m", 5400), ("45s", 45),
    ("90", 5400), ("10:30", 630), ("01:00:00", 3600), ("1-00:00:00", 86400), ("2-12", 216000)])
def test_durations(text, seconds):
    assert k8s.parse_duration(text, "--time") == seconds


def test_tolerations_use_kubectl_taint_syntax():
    assert k8s.parse_toleration("gpu") == {"key": "gpu", "operator": "Exists"}
    assert k8s.parse_toleration("dedicated=ml:NoExecute") == {
        "key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}
    assert k8s.parse_toleration("nvidia.com/gpu:NoSchedule") == {
        "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


# -- bad input: refused with one line, before anything is sent -----------------------------------

BAD_INPUT = [
    (["--memory", "12XB"], "--memory '12XB' is not a Kubernetes quantity"),
    (["--memory", "12m"], "less than one mebibyte"),
    (["--memory", "16Gi", "--memory-limit", "8Gi"], "--memory-limit 8Gi is below --memory 16Gi"),
    (["--cpus", "4", "--cpu-limit", "2"], "--cpu-limit 2 is below the request --cpus 4"),
    (["--shm-size", "lots"], "--shm-size 'lots' is not a Kubernetes quantity"),
    (["--job-name", "Train_Run"], "job name 'Train_Run' is not a valid Kubernetes name"),
    (["--job-name", "x" * 64], "is not a valid Kubernetes name"),
    (["-n", "ML"], "--namespace 'ML' is not a valid Kubernetes name"),
    (["--volume-claim", "my_pvc"], "--volume-claim 'my_pvc' is not a valid Kubernetes name"),
    (["-P", "lmdba=0.01"], "entry point 'train' has no parameter 'lmdba'"),
    (["-P", "lmbda"], "-P 'lmbda' is not NAME=VALUE"),
    (["--sweep", "lmbda=0.1,,0.2"], "has an empty value"),
    (["--env", "MLFLOW_TRACKING_PASSWORD=hunter2"], "looks like a credential"),
    (["--env", "AWS_SECRET_ACCESS_KEY=abc"], "--secret-env AWS_SECRET_ACCESS_KEY=SECRET:KEY"),
    (["--secret-env", "MLFLOW_TRACKING_PASSWORD=mlflow-auth"], "is not NAME=SECRET:KEY"),
    (["--secret-env", "TOKEN=Bad_Secret:key"], "secret name 'Bad_Secret' is not a valid"),
    (["--tracking-uri", "http://alice:hunter2@mlflow:5000"], "the tracking URI holds credentials"),
    (["--tracking-uri", "sqlite:///mlflow.db"], "is not a server the pods can reach"),
    (["--toleration", "gpu:Sometimes"], "effect 'Sometimes' is not one of"),
    (["--node-selector", "zone"], "--node-selector 'zone' is not NAME=VALUE"),
    (["--time", "soon"], "--time 'soon' is not a duration"),
    (["--ttl", "-1"], "--ttl '-1' is not a duration"),
    (["--gpu-resource", "gpu"], "--gpu-resource 'gpu' is not an extended resource name"),
    (["--sweep", "lmbda=0.1,0.2", "-P", "checkpoint_dir=/x"], "would make the runs share"),
    (["--sweep", "lmbda=0.1,0.2", "--run-id", "abc"], "cannot be combined with --sweep"),
    (["--mount-path", "data"], "--mount-path 'data' must be an absolute path"),
    (["--image", "/scratch/taskcodec.sif"], "is not a container image reference"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a)[:40] for a, _ in BAD_INPUT])
def test_bad_input_is_refused_with_one_clear_line(args, message):
    result = CliRunner().invoke(cli.launch, ["train", "--dry-run", "--tracking-uri", TRACKING,
                                             *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert result.stdout == ""


def test_unknown_entry_point_is_refused():
    result = CliRunner().invoke(cli.launch, ["trian", "--dry-run"])
    assert result.exit_code == 2
    assert "unknown entry point 'trian'" in result.stderr and "train" in result.stderr


def test_evaluate_cannot_ask_for_torchrun():
    spec = JobSpec(entry_point="evaluate", params={"checkpoint": "abc"}, gpus=2)
    with pytest.raises(ConfigError, match="only the training entry points"):
        k8s.validate(spec, k8s.K8sOptions())


# -- the CLI ---------------------------------------------------------------------------------------

def test_dry_run_prints_only_yaml_on_stdout_and_creates_no_run(tmp_path):
    result = CliRunner().invoke(cli.launch, [
        "train", "--dry-run", "--gpus", "1", "-P", "lmbda=0.01", "--tracking-uri", TRACKING,
        "--job-name", "demo"])
    assert result.exit_code == 0, result.output
    (job,) = list(yaml.safe_load_all(result.stdout))
    assert job["kind"] == "Job" and job["metadata"]["name"] == "demo"
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "dry run: nothing was sent" in result.stderr
    # The tests' tracking store (conftest: sqlite under tmp_path) was never touched.
    assert not (tmp_path / "mlflow.db").exists()


def test_dry_run_output_validates_strictly(tmp_path):
    result = CliRunner().invoke(cli.launch, [
        "train", "--dry-run", "--gpus", "2", "--memory", "8Gi", "--volume-claim", "data",
        "--sweep", "lmbda=0.01,0.02", "--sweep-mode", "jobs", "--tracking-uri", TRACKING])
    assert result.exit_code == 0, result.output
    path = tmp_path / "out.yaml"
    path.write_text(result.stdout)
    check = subprocess.run([str(VALIDATE), "--strict", str(path)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("passed") == 2


def test_default_job_names_are_unique_per_second_and_valid():
    from datetime import datetime

    name = k8s.default_job_name("My_Lab", "train", datetime(2026, 11, 26, 10, 15, 0))
    assert name == "my-lab-train-20261126-101500"
    k8s.check_name(name, "job name")


def test_help_is_fast_and_imports_neither_torch_nor_kubernetes_nor_mlflow():
    code = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from taskcodec.cli import k8s
        for command in (k8s.launch, k8s.status, k8s.log, k8s.cancel):
            result = CliRunner().invoke(command, ["--help"])
            assert result.exit_code == 0 and "Example" in result.output, result.output
        heavy = [m for m in ("torch", "kubernetes", "mlflow") if m in sys.modules]
        print(",".join(heavy) or "none")
    """)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "none"
    assert time.monotonic() - start < 5


# -- against the API emulator (a stand-in for a real API server; see the module docstring) --------

@pytest_asyncio.fixture
async def cluster(tmp_path):
    """kmock's Kubernetes emulator on 127.0.0.1 and a kubeconfig that points at it."""
    import kmock

    async with kmock.KubernetesEmulator() as emulator, \
            kmock.Server(emulator, host="127.0.0.1") as server:
        # A real API server knows these before any object exists (lists are then empty).
        emulator.resources["v1/pods"] = {}
        emulator.resources["batch/v1/jobs"] = {}
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "other",
            "clusters": [{"name": "kmock", "cluster": {"server": str(server.url)}},
                         {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "lab", "context": {"cluster": "kmock", "user": "tester",
                                                     "namespace": "ml"}},
                         {"name": "other", "context": {"cluster": "nowhere", "user": "tester"}}],
        }))
        yield emulator, ["--kubeconfig", str(kubeconfig), "--context", "lab"]


async def _invoke(command, args):
    """Run a CLI command in a thread: the emulator answers on this test's event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: CliRunner().invoke(command, args))


def _objects(emulator, plural):
    return {name: obj for (res, ns, name), obj in emulator.objects.items()
            if res.plural == plural and not obj.deleted}


def request_params(emulator, pod):
    """Query parameters of the log requests the emulator got for ``pod``."""
    return [r.params for r in emulator[f"get /api/v1/namespaces/ml/pods/{pod}/log"]]


def _play_controller(emulator, job_name, indexes, phase="Running"):
    """What the Job controller would do: one pod per index, and the Job's status."""
    import kmock

    pods = kmock.resource("", "v1", "pods")
    for index in indexes:
        name = f"{job_name}-{index}-abcde"
        labels = {"job-name": job_name, "batch.kubernetes.io/job-name": job_name}
        if index != "":
            labels["batch.kubernetes.io/job-completion-index"] = str(index)
        emulator.objects[pods, "ml", name] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ml", "labels": labels,
                         "creationTimestamp": "2026-11-26T10:00:00Z"},
            "spec": {"containers": [{"name": "train", "image": "x"}], "nodeName": "gpu-node-1"},
            "status": {"phase": phase}}
    jobs = kmock.resource("batch", "v1", "jobs")
    emulator.objects[jobs, "ml", job_name].patch({"status": {"active": len(indexes)}})


@pytest.mark.server
@pytest.mark.asyncio
async def test_launch_status_log_cancel_against_the_api_emulator(cluster, mlflow_server):
    from mlflow.tracking import MlflowClient

    emulator, conn = cluster
    result = await _invoke(cli.launch, [
        "train", *conn, "--gpus", "1", "--sweep", "lmbda=0.0067,0.013", "-P", "max_steps=5",
        "--job-name", "sweep-a", "--experiment", "k8s-test", "--volume-claim", "data",
        "--secret-env", "MLFLOW_TRACKING_PASSWORD=mlflow-auth:password"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "sweep-a"
    assert "created job sweep-a in namespace ml (2 runs)" in result.stderr

    # The Job reached the API server, in the context's namespace, as rendered.
    job = _objects(emulator, "jobs")["sweep-a"]
    assert job["metadata"]["namespace"] == "ml"
    run_ids = json.loads(job["metadata"]["annotations"][k8s.ANN_RUN_IDS])
    script = _container(job)["args"][2]
    assert all(f"--run-id {rid}" in script for rid in run_ids)
    # ... and each MLflow run, created at launch, names its Job and index.
    client = MlflowClient(mlflow_server.uri)
    for index, rid in enumerate(run_ids):
        run = client.get_run(rid)
        assert run.data.tags["k8s_job"] == "sweep-a"
        assert run.data.tags["k8s_namespace"] == "ml"
        assert run.data.tags["k8s_completion_index"] == str(index)
        assert run.data.tags["k8s_context"] == "lab"
        assert client.get_experiment(run.info.experiment_id).name == "k8s-test"

    _play_controller(emulator, "sweep-a", ["0", "1"])
    status = await _invoke(cli.status, ["sweep-a", *conn])
    assert status.exit_code == 0, status.output
    assert "job sweep-a (ml): Running, 0/2 done, 0 failed, 2 active" in status.stdout
    assert f"MLflow run index 1: {run_ids[1]}" in status.stdout
    assert "pod sweep-a-1-abcde [index 1]: Running on gpu-node-1" in status.stdout

    listing = await _invoke(cli.status, conn)
    assert listing.stdout.split()[:2] == ["sweep-a", "Running"]

    emulator["get /api/v1/namespaces/ml/pods/sweep-a-1-abcde/log"] << b"step 1 loss 2.5\nstep 2 loss 2.1\n"
    logs = await _invoke(cli.log, ["sweep-a", "--index", "1", "--tail", "2", *conn])
    assert logs.exit_code == 0, logs.output
    assert logs.stdout == "step 1 loss 2.5\nstep 2 loss 2.1\n"
    assert request_params(emulator, "sweep-a-1-abcde")[-1].get("tailLines") == "2"

    follow = await _invoke(cli.log, ["sweep-a", "-f", "--index", "1", *conn])
    assert follow.exit_code == 0 and follow.stdout.endswith("step 2 loss 2.1\n")
    assert request_params(emulator, "sweep-a-1-abcde")[-1].get("follow") == "true"
    follow_two = await _invoke(cli.log, ["sweep-a", "-f", *conn])
    assert follow_two.exit_code == 2 and "give --index to follow one" in follow_two.stderr

    cancelled = await _invoke(cli.cancel, ["sweep-a", *conn])
    assert cancelled.exit_code == 0, cancelled.output
    assert "sweep-a" not in _objects(emulator, "jobs")
    assert "marked 2 MLflow run(s) KILLED" in cancelled.stderr
    assert [client.get_run(r).info.status for r in run_ids] == ["KILLED", "KILLED"]

    gone = await _invoke(cli.status, ["sweep-a", *conn])
    assert gone.exit_code == 2
    assert gone.stderr.strip() == "Error: no job or launch 'sweep-a' in namespace ml"


@pytest.mark.server
@pytest.mark.asyncio
async def test_one_job_per_combination_is_watched_as_one_launch(cluster, mlflow_server):
    emulator, conn = cluster
    result = await _invoke(cli.launch, ["train", *conn, "--sweep", "lmbda=0.01,0.02",
                                        "--sweep-mode", "jobs", "--job-name", "grid"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["grid-0", "grid-1"]
    # A Job that is not part of the launch must not be picked up by the label.
    await _invoke(cli.launch, ["train", *conn, "--job-name", "gridless"])
    assert sorted(_objects(emulator, "jobs")) == ["grid-0", "grid-1", "gridless"]
    status = await _invoke(cli.status, ["grid", *conn])
    assert status.exit_code == 0, status.output
    assert [line.split()[1] for line in status.stdout.splitlines()
            if line.startswith("job ")] == ["grid-0", "grid-1"]


@pytest.mark.server
@pytest.mark.asyncio
async def test_refused_submission_fails_its_runs_and_says_why(cluster, mlflow_server):
    from mlflow.tracking import MlflowClient

    emulator, conn = cluster
    first = await _invoke(cli.launch, ["train", *conn, "--job-name", "twice"])
    assert first.exit_code == 0, first.output
    second = await _invoke(cli.launch, ["train", *conn, "--job-name", "twice",
                                        "--experiment", "refused"])
    assert second.exit_code == 2
    line = second.stderr.strip()
    assert line.startswith("Error: creating job twice in namespace ml: HTTP 409"), line
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("refused")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "job not created" in run.data.tags["launch_error"]


@pytest.mark.server
@pytest.mark.asyncio
async def test_relaunch_continues_an_existing_run_in_its_experiment(cluster, mlflow_server):
    from mlflow.tracking import MlflowClient

    emulator, conn = cluster
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment("earlier")
    earlier = client.create_run(experiment_id).info.run_id
    client.set_terminated(earlier, "FAILED")  # e.g. its Job ran out of retries
    result = await _invoke(cli.launch, ["train", *conn, "--run-id", earlier,
                                        "--job-name", "again"])
    assert result.exit_code == 0, result.output
    args = _container(_objects(emulator, "jobs")["again"])["args"]
    assert args[args.index("--run-id") + 1] == earlier
    assert args[args.index("--experiment-name") + 1] == "earlier"
    run = client.get_run(earlier)
    assert run.data.tags["k8s_job"] == "again"
    assert len(client.search_runs([experiment_id])) == 1  # no new run


@pytest.mark.asyncio
async def test_bad_input_sends_nothing_to_the_cluster(cluster):
    emulator, conn = cluster
    result = await _invoke(cli.launch, ["train", *conn, "--memory", "12XB",
                                        "--tracking-uri", TRACKING])
    assert result.exit_code == 2 and "12XB" in result.stderr
    assert len(emulator) == 0  # not a single request reached the API server


def test_no_kubeconfig_outside_a_cluster_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.delenv("KUBECONFIG", raising=False)
    result = CliRunner().invoke(cli.status, [])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: no kubeconfig ($KUBECONFIG or ~/.kube/config) and "
                                     "not inside a cluster: cannot reach Kubernetes")
    missing = CliRunner().invoke(cli.status, ["--kubeconfig", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert missing.stderr.startswith(f"Error: cannot read the kubeconfig {tmp_path / 'nope.yaml'}")


@pytest.mark.asyncio
async def test_unknown_context_is_one_clear_line(cluster):
    _, conn = cluster
    result = await _invoke(cli.status, [*conn[:2], "--context", "nope"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: no context 'nope' in the kubeconfig (have: lab, other)"


# -- the pod's main process: SIGTERM reaches the trainer, which checkpoints ----------------------

@pytest.mark.slow
def test_mlflow_run_wrapper_turns_sigterm_into_a_graceful_stop(tmp_path):
    """Plain `mlflow run` dies on SIGTERM and orphans the trainer; the wrapper makes mlflow
    pass SIGTERM on and wait, exits 75 so the Job retries the pod, and leaves the run KILLED
    (not FAILED, which mlflow itself would write)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # the test's own sqlite store (conftest)
    run_id = client.create_run(client.create_experiment("wrapper")).info.run_id
    project = tmp_path / "project"
    project.mkdir()
    marker = tmp_path / "marker"
    (project / "MLproject").write_text(textwrap.dedent(f"""
        name: stand-in-trainer
        entry_points:
          main:
            command: "{sys.executable} {project / 'train.py'}"
    """))
    (project / "train.py").write_text(textwrap.dedent(f"""
        import pathlib, signal, sys, time
        marker = pathlib.Path({str(marker)!r})
        def stop(signum, frame):
            time.sleep(1)  # a checkpoint takes a moment; the wrapper must wait for it
            marker.write_text("checkpointed")
            sys.exit(75)
        signal.signal(signal.SIGTERM, stop)
        marker.write_text("training")
        time.sleep(120)
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "taskcodec.launch.mlflow_run", str(project),
                             "-e", "main", "--env-manager", "local", "--run-id", run_id], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (marker.exists() and marker.read_text() == "training"):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the stand-in trainer never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.read_text() == "checkpointed"
    assert client.get_run(run_id).info.status == "KILLED"
