"""Kubernetes launcher: a :class:`JobSpec` becomes a ``batch/v1`` Job running the entry point in
the training image (``docker/Dockerfile``).

Three layers, as in mlflow's Kubernetes backend and submitit:

* **render** (pure, golden-tested): :func:`validate`, :func:`render_jobs`, :func:`to_yaml`.
  Everything a user can get wrong is refused here, before anything is sent.
* **submit**: :func:`launch` creates the MLflow runs first, so that each pod knows its run id
  (``mlflow run --run-id``) and each run knows its Job, then :func:`submit` creates the Jobs.
* **watch**: :func:`job_status`, :func:`pod_logs`, :func:`cancel`.

A sweep is one Indexed Job (one MLflow run per completion index; the pod picks its command by
``$JOB_COMPLETION_INDEX``) or one Job per combination. Preemption: a pod stopped by SIGTERM
checkpoints and exits 75 (see :mod:`taskcodec.launch.mlflow_run`); the Job's pod failure policy
retries it without spending the backoff limit, and the new pod resumes the same MLflow run from
the checkpoint on the volume (``checkpoint_dir`` is put there) or from the run's artifacts.

Torch-free; ``kubernetes`` and ``mlflow`` are imported only by the functions that talk to a
cluster or a tracking server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import yaml

from taskcodec import __version__
from taskcodec.errors import ConfigError, TaskcodecError
from taskcodec.launch.spec import JobSpec, mlflow_command

IMAGE_PROJECT_DIR = "/opt/taskcodec"  # where docker/Dockerfile puts MLProject and the code
IMAGE_UID = 1000  # the image's non-root user (and group)
DEFAULT_IMAGE = f"taskcodec:{__version__}"
DEFAULT_MOUNT = "/mnt/taskcodec"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on GPU nodes by NVIDIA GPU feature discovery
PREEMPTED_EXIT = 75  # taskcodec.engine.PREEMPTED_EXIT: checkpointed after SIGTERM, retry me
MANAGED_BY = "k8s-launch"
LABEL_LAUNCH = "taskcodec/launch"
LABEL_RUN_ID = "taskcodec/mlflow-run-id"
ANN_RUN_IDS = "taskcodec/mlflow-run-ids"
ANN_TRACKING_URI = "taskcodec/mlflow-tracking-uri"
ANN_EXPERIMENT = "taskcodec/mlflow-experiment"
ANN_PARAMS = "taskcodec/params"
TRACKING_SCHEMES = ("http://", "https://", "databricks")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
# Names of variables that hold credentials: those may only come from a Secret.
_CREDENTIAL = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY",
                         re.IGNORECASE)
_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
                       r"(?P<suffix>[KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIX = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
           "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
           "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
           "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
           "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}
_TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class KubernetesError(TaskcodecError):
    """The cluster refused a request or cannot be reached (names the object and the reason)."""


@dataclass
class K8sOptions:
    """What a Kubernetes Job needs beyond the launcher-neutral :class:`JobSpec`."""

    job_name: str = "taskcodec"        # the Job's name (a sweep in "jobs" mode appends -INDEX)
    namespace: str = ""                # "" : the kubeconfig context's namespace
    cpu_limit: str = ""                # "" : no CPU limit (requests = JobSpec.cpus)
    memory_limit: str = ""             # "" : the same as the request (JobSpec.memory)
    shm_size: str = "1Gi"              # /dev/shm (memory emptyDir) for data loader workers; "0": none
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)  # see parse_toleration
    volume_claim: str = ""             # a PVC for data and checkpoints
    mount_path: str = DEFAULT_MOUNT    # where the PVC is mounted
    secret_env: dict[str, str] = field(default_factory=dict)  # NAME -> "SECRET:KEY"
    backoff_limit: int = 3             # failed pods before the Job (or sweep index) fails
    ttl: str = "3d"                    # delete the finished Job (and its logs) after this long
    grace_period: int = 120            # seconds from SIGTERM to SIGKILL, for the checkpoint
    sweep_mode: str = "indexed"        # "indexed": one Indexed Job; "jobs": one Job per point
    parallelism: int = 0               # pods of an Indexed Job at once (0: all)
    image_pull_policy: str = "IfNotPresent"
    image_pull_secret: str = ""        # a Secret with registry credentials
    service_account: str = ""
    labels: dict[str, str] = field(default_factory=dict)      # extra labels for Job and pods


# -- small parsers (each refuses bad input with the option's name) -----------------------------

def parse_quantity(text: str, option: str) -> Decimal:
    """A Kubernetes quantity (``16Gi``, ``500m``, ``8G``, ``1.5``) as a number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ConfigError(f"{option} {text!r} is not a Kubernetes quantity "
                          "(examples: 16Gi, 512Mi, 8G, 500m, 2)")
    number = Decimal(match["num"])
    suffix = match["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** int(suffix[1:])
    return number * _SUFFIX[suffix]


def _check_memory(text: str, option: str) -> Decimal:
    value = parse_quantity(text, option)
    if value < 2 ** 20:
        raise ConfigError(f"{option} {text!r} is less than one mebibyte "
                          "(memory is in bytes: did you mean Mi or Gi?)")
    return value


def parse_duration(text: str, option: str) -> int:
    """Seconds from ``90s``, ``30m``, ``12h``, ``2d``, ``1h30m``, or Slurm's ``MINUTES``,
    ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS`` (a bare number is minutes,
    as in Slurm, so one ``--time`` means the same to both launchers)."""
    raw = str(text).strip()
    units = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", raw)
    if raw and units and any(units.groups()):
        d, h, m, s = (int(g or 0) for g in units.groups())
        return ((d * 24 + h) * 60 + m) * 60 + s
    slurm = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", raw)
    if slurm:
        days, first, second, third = slurm.groups()
        if days is not None:  # D-HH[:MM[:SS]]
            h, m, s = int(first), int(second or 0), int(third or 0)
            seconds = ((int(days) * 24 + h) * 60 + m) * 60 + s
        elif third is not None:  # HH:MM:SS
            seconds = (int(first) * 60 + int(second)) * 60 + int(third)
        elif second is not None:  # MM:SS
            seconds = int(first) * 60 + int(second)
        else:  # minutes
            seconds = int(first) * 60
        return seconds
    raise ConfigError(f"{option} {text!r} is not a duration "
                      "(examples: 90m, 12h, 2d, 1h30m, 1-00:00:00)")


def parse_toleration(text: str) -> dict[str, str]:
    """kubectl's taint syntax: ``KEY[=VALUE][:EFFECT]`` (without a value: operator Exists)."""
    rest, _, effect = text.partition(":")
    key, eq, value = rest.partition("=")
    _check_label_key(key, f"--toleration {text!r}: key")
    result = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        _check_label_value(value, f"--toleration {text!r}: value")
        result["value"] = value
    if effect:
        if effect not in _TOLERATION_EFFECTS:
            raise ConfigError(f"--toleration {text!r}: effect {effect!r} is not one of "
                              f"{', '.join(_TOLERATION_EFFECTS)}")
        result["effect"] = effect
    return result


def parse_secret_env(items: Mapping[str, str]) -> dict[str, str]:
    """``{"NAME": "SECRET:KEY"}`` checked (``--secret-env NAME=SECRET:KEY``)."""
    for name, ref in items.items():
        secret, sep, key = ref.partition(":")
        if not sep or not secret or not key:
            raise ConfigError(f"--secret-env {name}={ref!r} is not NAME=SECRET:KEY")
        check_name(secret, f"--secret-env {name}: secret name", subdomain=True)
        if not _SECRET_KEY.match(key):
            raise ConfigError(f"--secret-env {name}: {key!r} is not a valid key of a Secret")
    return dict(items)


def check_name(name: str, what: str, *, subdomain: bool = False, max_len: int = 63) -> str:
    """A Kubernetes object name: lower-case letters, digits and '-' (and '.' for subdomains)."""
    pattern = _DNS_SUBDOMAIN if subdomain else _DNS_LABEL
    limit = 253 if subdomain else max_len
    if not pattern.match(name or "") or len(name) > limit:
        raise ConfigError(f"{what} {name!r} is not a valid Kubernetes name (lower-case letters, "
                          f"digits and '-', starting and ending with a letter or digit, "
                          f"at most {limit} characters)")
    return name


def _check_label_key(key: str, what: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if (slash and (not _DNS_SUBDOMAIN.match(prefix) or len(prefix) > 253)) \
            or not _LABEL_NAME.match(name) or len(name) > 63:
        raise ConfigError(f"{what} {key!r} is not a valid Kubernetes label key")


def _check_label_value(value: str, what: str) -> None:
    if value and (not _LABEL_NAME.match(value) or len(value) > 63):
        raise ConfigError(f"{what} {value!r} is not a valid Kubernetes label value "
                          "(at most 63 letters, digits, '-', '_' or '.')")


def default_job_name(prefix: str, entry_point: str, now: datetime) -> str:
    """``PREFIX-ENTRY-YYYYMMDD-HHMMSS``: unique per launch, sortable, a valid Job name."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{entry_point}".lower()).strip("-")
    return f"{base[:45].rstrip('-')}-{now:%Y%m%d-%H%M%S}"


# -- validation ---------------------------------------------------------------------------------

def validate(spec: JobSpec, opts: K8sOptions) -> None:
    """Refuse, with one clear line, anything the cluster would refuse or that would go wrong."""
    spec.validate()
    count = len(spec.combinations())
    suffix = len(f"-{count - 1}") if count > 1 else 0
    check_name(opts.job_name, "job name", max_len=63 - suffix)
    if opts.namespace:
        check_name(opts.namespace, "--namespace")
    if spec.nodes != 1:
        raise ConfigError(f"--nodes {spec.nodes}: the Kubernetes launcher runs single-node jobs "
                          "(use up to a node's GPUs with --gpus)")
    if spec.gpus > 1 and not spec.entry_point.startswith("train"):
        raise ConfigError(f"--gpus {spec.gpus}: only the training entry points (train*) run on "
                          f"several GPUs (torchrun), not {spec.entry_point!r}")
    if spec.venv:
        raise ConfigError("--venv has no meaning on Kubernetes: jobs run in the image (--image)")
    image = spec.image or DEFAULT_IMAGE
    if any(c.isspace() for c in image) or image.endswith(".sif"):
        raise ConfigError(f"--image {image!r} is not a container image reference")
    if spec.sweep and spec.run_id:
        raise ConfigError("--run-id continues one run; it cannot be combined with --sweep")
    if "checkpoint_dir" in spec.params and count > 1:
        raise ConfigError("-P checkpoint_dir with --sweep would make the runs share checkpoints; "
                          "leave it out (each run gets VOLUME/checkpoints/RUN_ID)")
    _check_resources(spec, opts)
    _check_environment(spec, opts)
    _check_job_settings(spec, opts)


def _check_resources(spec: JobSpec, opts: K8sOptions) -> None:
    if opts.cpu_limit and parse_quantity(opts.cpu_limit, "--cpu-limit") < Decimal(spec.cpus):
        raise ConfigError(f"--cpu-limit {opts.cpu_limit} is below the request --cpus {spec.cpus}")
    if spec.memory:
        memory = _check_memory(spec.memory, "--memory")
        if opts.memory_limit and _check_memory(opts.memory_limit, "--memory-limit") < memory:
            raise ConfigError(f"--memory-limit {opts.memory_limit} is below --memory {spec.memory}")
    elif opts.memory_limit:
        _check_memory(opts.memory_limit, "--memory-limit")
    if parse_quantity(opts.shm_size, "--shm-size"):  # "0": no /dev/shm volume
        _check_memory(opts.shm_size, "--shm-size")
    domain, slash, resource = opts.gpu_resource.partition("/")
    if not slash or not _DNS_SUBDOMAIN.match(domain) or not _LABEL_NAME.match(resource):
        raise ConfigError(f"--gpu-resource {opts.gpu_resource!r} is not an extended resource "
                          "name (such as nvidia.com/gpu)")
    for key, value in opts.node_selector.items():
        _check_label_key(key, "--node-selector")
        _check_label_value(value, f"--node-selector {key}:")
    if opts.volume_claim:
        check_name(opts.volume_claim, "--volume-claim", subdomain=True)
    if not opts.mount_path.startswith("/") or opts.mount_path.rstrip("/") in ("", "/dev/shm"):
        raise ConfigError(f"--mount-path {opts.mount_path!r} must be an absolute path "
                          "(not / or /dev/shm)")


def _check_environment(spec: JobSpec, opts: K8sOptions) -> None:
    """Variables, the tracking URI and credentials: a credential only ever as a secretKeyRef."""
    if spec.tracking_uri:
        if not spec.tracking_uri.startswith(TRACKING_SCHEMES):
            raise ConfigError(f"tracking URI {spec.tracking_uri!r} is not a server the pods can "
                              "reach (use http://, https:// or databricks)")
        if re.match(r"^[a-z+]+://[^/@]*:[^/@]*@", spec.tracking_uri):
            raise ConfigError("the tracking URI holds a password: put the credentials in a "
                              "Secret (--secret-env MLFLOW_TRACKING_PASSWORD=SECRET:KEY)")
    for name in spec.env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"--env {name!r} is not a valid environment variable name")
        if _CREDENTIAL.search(name):
            raise ConfigError(f"--env {name}: credentials are never put in a manifest; store it "
                              f"in a Secret and use --secret-env {name}=SECRET:KEY")
    for name in opts.secret_env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"--secret-env {name!r} is not a valid environment variable name")
    parse_secret_env(opts.secret_env)
    both = set(spec.env) & set(opts.secret_env)
    if both:
        raise ConfigError(f"{', '.join(sorted(both))} given both with --env and --secret-env")


def _check_job_settings(spec: JobSpec, opts: K8sOptions) -> None:
    if spec.time:
        parse_duration(spec.time, "--time")
    parse_duration(opts.ttl, "--ttl")
    for label, value in (("--backoff-limit", opts.backoff_limit), ("--grace-period",
                         opts.grace_period), ("--parallelism", opts.parallelism)):
        if value < 0:
            raise ConfigError(f"{label} {value} is out of range: must be >= 0")
    if opts.sweep_mode not in ("indexed", "jobs"):
        raise ConfigError(f"--sweep-mode {opts.sweep_mode!r} is not one of: indexed, jobs")
    if opts.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        raise ConfigError(f"--pull-policy {opts.image_pull_policy!r} is not one of: "
                          "Always, IfNotPresent, Never")
    for what, name in (("--image-pull-secret", opts.image_pull_secret),
                       ("--service-account", opts.service_account)):
        if name:
            check_name(name, what, subdomain=True)
    for key, value in opts.labels.items():
        _check_label_key(key, "--label")
        _check_label_value(value, f"--label {key}:")


# -- rendering (pure) ---------------------------------------------------------------------------

def container_command(spec: JobSpec, params: Mapping[str, str], run_id: str,
                      opts: K8sOptions) -> list[str]:
    """The argv of one run in the container: ``mlflow run`` of the project in the image,
    continuing ``run_id``, through :mod:`taskcodec.launch.mlflow_run` (which turns the pod's
    SIGTERM into a checkpoint). Several GPUs: ``torchrun`` starts one such process per GPU;
    rank 0 logs to the run (see taskcodec.distributed), as in the Slurm launcher."""
    params = dict(params)
    if opts.volume_claim and "checkpoint_dir" not in params:
        params["checkpoint_dir"] = f"{opts.mount_path.rstrip('/')}/checkpoints/{run_id}"
    project = spec.project_dir or IMAGE_PROJECT_DIR
    argv = mlflow_command(spec.entry_point, params, project, spec.experiment, run_id)
    argv = ["python", "-m", "taskcodec.launch.mlflow_run", *argv[2:]]
    if spec.gpus > 1:
        argv = ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={spec.gpus}",
                "--no-python", *argv]
    return argv


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def index_script(commands: list[list[str]]) -> str:
    """The shell script of an Indexed Job: the pod runs the command of its completion index."""
    lines = ['case "$JOB_COMPLETION_INDEX" in']
    for index, argv in enumerate(commands):
        lines.append(f"  {index}) exec {' '.join(_quote(w) for w in argv)} ;;")
    lines.append('  *) echo "k8s-launch: no command for completion index '
                 '$JOB_COMPLETION_INDEX" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines) + "\n"


def _env(spec: JobSpec, opts: K8sOptions, image: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if spec.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": spec.tracking_uri})
    if spec.experiment:
        env.append({"name": "MLFLOW_EXPERIMENT_NAME", "value": spec.experiment})
    # Read by taskcodec.tracking.environment_tags: the run names its pod, Job and image.
    env.append({"name": "TASKCODEC_K8S_JOB", "value": opts.job_name})
    env.append({"name": "TASKCODEC_K8S_POD",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    env.append({"name": "TASKCODEC_IMAGE", "value": image})
    if "OMP_NUM_THREADS" not in spec.env:
        # One thread per requested CPU and process, not one per core of the node.
        threads = max(1, spec.cpus // max(spec.gpus, 1))
        env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    for name in sorted(spec.env):
        env.append({"name": name, "value": spec.env[name]})
    for name in sorted(opts.secret_env):
        secret, _, key = opts.secret_env[name].partition(":")
        env.append({"name": name,
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _resources(spec: JobSpec, opts: K8sOptions) -> dict[str, dict[str, str]]:
    requests = {"cpu": str(spec.cpus)}
    limits: dict[str, str] = {}
    if opts.cpu_limit:
        limits["cpu"] = opts.cpu_limit
    if spec.memory:
        requests["memory"] = spec.memory
        limits["memory"] = opts.memory_limit or spec.memory
    elif opts.memory_limit:
        limits["memory"] = opts.memory_limit
    if spec.gpus:
        limits[opts.gpu_resource] = str(spec.gpus)  # extended resources: requests = limits
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def _labels(spec: JobSpec, opts: K8sOptions, launch: str, run_ids: list[str]) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "taskcodec",
        "app.kubernetes.io/component": spec.entry_point,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_LAUNCH: launch,
    }
    if len(run_ids) == 1:
        labels[LABEL_RUN_ID] = run_ids[0]
    labels.update(opts.labels)
    return labels


def render_job(spec: JobSpec, opts: K8sOptions, run_ids: list[str], *,
               launch: str = "") -> dict[str, Any]:
    """One ``batch/v1`` Job: a plain Job for one run, an Indexed Job for a sweep (one run per
    completion index, ``run_ids`` in index order). Pure: same arguments, same manifest."""
    combos = spec.combinations()
    if len(run_ids) != len(combos):
        raise ValueError(f"{len(combos)} parameter sets but {len(run_ids)} run ids")
    image = spec.image or DEFAULT_IMAGE
    container_name = re.sub(r"[^a-z0-9-]+", "-", spec.entry_point.lower()).strip("-") or "main"
    commands = [container_command(spec, p, r, opts) for p, r in zip(combos, run_ids)]
    indexed = len(combos) > 1
    container: dict[str, Any] = {
        "name": container_name,
        "image": image,
        "imagePullPolicy": opts.image_pull_policy,
        # The image's ENTRYPOINT (tini) stays PID 1 and passes SIGTERM on.
        "args": ["/bin/sh", "-c", index_script(commands)] if indexed else commands[0],
        "env": _env(spec, opts, image),
        "resources": _resources(spec, opts),
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    mounts, volumes = [], []
    if parse_quantity(opts.shm_size, "--shm-size"):
        # PyTorch data loader workers pass batches through /dev/shm; the default 64 MB is too small.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory",
                                                     "sizeLimit": opts.shm_size}})
    if opts.volume_claim:
        mounts.append({"name": "data", "mountPath": opts.mount_path})
        volumes.append({"name": "data",
                        "persistentVolumeClaim": {"claimName": opts.volume_claim}})
    if mounts:
        container["volumeMounts"] = mounts
    tolerations = [dict(t) for t in opts.tolerations]
    if spec.gpus:
        # GPU nodes are commonly tainted so that only GPU jobs land there.
        tolerations.append({"key": opts.gpu_resource, "operator": "Exists",
                            "effect": "NoSchedule"})
    node_selector = dict(opts.node_selector)
    if spec.gpu_type:
        node_selector.setdefault(GPU_PRODUCT_LABEL, spec.gpu_type)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job makes a new pod; needed by the pod failure policy
        "terminationGracePeriodSeconds": opts.grace_period,
        "securityContext": {"runAsNonRoot": True, "fsGroup": IMAGE_UID,
                            "fsGroupChangePolicy": "OnRootMismatch",
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if opts.service_account:
        pod_spec["serviceAccountName"] = opts.service_account
    if opts.image_pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": opts.image_pull_secret}]

    labels = _labels(spec, opts, launch or opts.job_name, run_ids)
    annotations = {ANN_RUN_IDS: json.dumps(run_ids), ANN_PARAMS: json.dumps(combos)}
    if spec.tracking_uri:
        annotations[ANN_TRACKING_URI] = spec.tracking_uri
    if spec.experiment:
        annotations[ANN_EXPERIMENT] = spec.experiment
    job_spec: dict[str, Any] = {}
    if indexed:
        job_spec.update(completionMode="Indexed", completions=len(combos),
                        parallelism=opts.parallelism or len(combos),
                        backoffLimitPerIndex=opts.backoff_limit)
    else:
        job_spec["backoffLimit"] = opts.backoff_limit
    if spec.time:
        job_spec["activeDeadlineSeconds"] = parse_duration(spec.time, "--time")
    job_spec["ttlSecondsAfterFinished"] = parse_duration(opts.ttl, "--ttl")
    job_spec["podFailurePolicy"] = {"rules": [
        # Evicted, preempted or on a drained node: retry without spending the backoff limit.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # Stopped by SIGTERM after writing a checkpoint: the next pod resumes the run.
        {"action": "Ignore", "onExitCodes": {"containerName": container_name, "operator": "In",
                                             "values": [PREEMPTED_EXIT]}},
    ]}
    job_spec["template"] = {"metadata": {"labels": labels}, "spec": pod_spec}
    metadata: dict[str, Any] = {"name": opts.job_name}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    metadata.update(labels=labels, annotations=annotations)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def render_jobs(spec: JobSpec, opts: K8sOptions, run_ids: list[str]) -> list[dict[str, Any]]:
    """The Jobs of one launch: one Job, or with ``sweep_mode="jobs"`` one Job per combination
    (named JOB-0, JOB-1, ... and sharing the label ``taskcodec/launch=JOB``)."""
    combos = spec.combinations()
    if len(combos) == 1 or opts.sweep_mode == "indexed":
        return [render_job(spec, opts, run_ids)]
    return [render_job(replace(spec, params=combo, sweep={}),
                       replace(opts, job_name=f"{opts.job_name}-{index}"), [run_id],
                       launch=opts.job_name)
            for index, (combo, run_id) in enumerate(zip(combos, run_ids))]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the sweep script reads as a script; no YAML
    anchors for the labels that Job and pods share."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """Manifests as one YAML stream (``kubectl apply -f -`` takes it as it is)."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         explicit_start=True, width=100)


# -- talking to the cluster ---------------------------------------------------------------------

@dataclass
class Cluster:
    """An API client for one kubeconfig context (or the in-cluster service account)."""

    api: Any  # kubernetes.client.ApiClient
    namespace: str  # the context's namespace, used when none is given

    def batch(self):
        from kubernetes import client

        return client.BatchV1Api(self.api)

    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api)


IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def connect(context: str = "", kubeconfig: str = "") -> Cluster:
    """Kubeconfig (``$KUBECONFIG`` or ~/.kube/config, ``context`` or the current one), else the
    in-cluster service account when running in a pod."""
    from kubernetes import client, config

    try:
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig or None)
    except (config.ConfigException, OSError, TypeError) as err:
        if context or kubeconfig:
            where = kubeconfig or "~/.kube/config"
            raise KubernetesError(f"cannot read the kubeconfig {where}: {err}") from None
        try:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise KubernetesError("no kubeconfig ($KUBECONFIG or ~/.kube/config) and not "
                                  "inside a cluster: cannot reach Kubernetes") from None
        with open(IN_CLUSTER_NAMESPACE, encoding="utf-8") as fh:
            return Cluster(client.ApiClient(configuration), fh.read().strip())
    chosen = next((c for c in contexts if c["name"] == context), None) if context else current
    if chosen is None:
        raise KubernetesError(f"no context {context!r} in the kubeconfig (have: "
                              f"{', '.join(c['name'] for c in contexts)})")
    try:
        api = config.new_client_from_config(config_file=kubeconfig or None,
                                            context=chosen["name"])
    except config.ConfigException as err:
        raise KubernetesError(f"kubeconfig context {chosen['name']!r}: {err}") from None
    return Cluster(api, chosen.get("context", {}).get("namespace") or "default")


def _api_error(err: Exception, doing: str) -> KubernetesError:
    """One line from an ApiException (its JSON ``message``) or a connection error."""
    status = getattr(err, "status", None)
    message = str(err).splitlines()[0]
    body = getattr(err, "body", None)
    if body:
        try:
            message = json.loads(body).get("message") or message
        except (ValueError, AttributeError):
            pass
    prefix = f"HTTP {status}: " if status else ""
    return KubernetesError(f"{doing}: {prefix}{message}")


def submit(manifests: list[dict[str, Any]], cluster: Cluster, namespace: str = "") -> list[str]:
    """Create the Jobs; returns their names. Stops at the first refusal, naming the Jobs that
    were created before it (so that they can be cancelled)."""
    batch = cluster.batch()
    created: list[str] = []
    for manifest in manifests:
        ns = manifest["metadata"].get("namespace") or namespace or cluster.namespace
        name = manifest["metadata"]["name"]
        try:
            batch.create_namespaced_job(ns, manifest)
        except Exception as err:
            done = f" (already created: {', '.join(created)})" if created else ""
            raise _api_error(err, f"creating job {name} in namespace {ns}{done}") from None
        created.append(name)
    return created


@dataclass
class LaunchResult:
    job_names: list[str]
    namespace: str
    run_ids: list[str]
    experiment_id: str


@dataclass
class Runs:
    experiment_id: str
    experiment: str  # its name
    run_ids: list[str]  # in completion-index order


def create_runs(spec: JobSpec, opts: K8sOptions, namespace: str, context: str = "") -> Runs:
    """One MLflow run per combination, created now so that each pod gets ``--run-id``; each run
    is tagged with its Job (``k8s_job``, ``k8s_namespace``, ``k8s_completion_index``).
    ``spec.run_id`` continues that run (in its own experiment) instead."""
    from mlflow.tracking import MlflowClient

    from taskcodec.tracking import experiment_name

    client = MlflowClient(tracking_uri=spec.tracking_uri)
    combos = spec.combinations()
    indexed = len(combos) > 1 and opts.sweep_mode == "indexed"
    try:
        if spec.run_id:
            experiment_id = client.get_run(spec.run_id).info.experiment_id
            name = client.get_experiment(experiment_id).name
            run_ids = [spec.run_id]
        else:
            name = spec.experiment or experiment_name()
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run_ids = []
        for index in range(len(combos)):
            job = opts.job_name if indexed or len(combos) == 1 else f"{opts.job_name}-{index}"
            tags = {"k8s_job": job, "k8s_namespace": namespace, "launcher": MANAGED_BY,
                    "image": spec.image or DEFAULT_IMAGE,
                    "mlflow.project.backend": "kubernetes",
                    "mlflow.project.entryPoint": spec.entry_point,
                    "mlflow.source.type": "PROJECT",
                    "mlflow.source.name": spec.project_dir or IMAGE_PROJECT_DIR}
            if context:
                tags["k8s_context"] = context
            if indexed:
                tags["k8s_completion_index"] = str(index)
            if spec.run_id:
                for key, value in tags.items():
                    client.set_tag(spec.run_id, key, value)
            else:
                run_name = f"{opts.job_name}-{index}" if len(combos) > 1 else opts.job_name
                run = client.create_run(experiment_id, tags=tags, run_name=run_name)
                run_ids.append(run.info.run_id)
    except TaskcodecError:
        raise
    except Exception as err:
        from taskcodec.errors import TrackingError

        raise TrackingError(f"cannot create the MLflow runs at {spec.tracking_uri}: "
                            f"{str(err).splitlines()[0][:200]}") from None
    return Runs(experiment_id, name, run_ids)


def end_runs(tracking_uri: str, run_ids: list[str], status: str, note: str = "") -> list[str]:
    """Mark runs that are still RUNNING as ``status``; returns the ids it could not update."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    failed = []
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
                if note:
                    client.set_tag(run_id, "k8s_note", note)
                client.set_terminated(run_id, status)
        except Exception:
            failed.append(run_id)
    return failed


def launch(spec: JobSpec, opts: K8sOptions, cluster: Cluster, context: str = "") -> LaunchResult:
    """Validate, create the MLflow runs, render and submit. A refused submission marks the
    runs it created FAILED, so no run waits forever for a pod that never comes."""
    validate(spec, opts)
    if not spec.tracking_uri:
        raise ConfigError("no tracking URI: give --tracking-uri or set MLFLOW_TRACKING_URI to an "
                          "MLflow server that the pods can reach")
    namespace = opts.namespace or cluster.namespace
    opts = replace(opts, namespace=namespace)
    runs = create_runs(spec, opts, namespace, context)
    manifests = render_jobs(replace(spec, experiment=runs.experiment), opts, runs.run_ids)
    try:
        names = submit(manifests, cluster, namespace)
    except KubernetesError as err:
        if not spec.run_id:
            end_runs(spec.tracking_uri, runs.run_ids, "FAILED", f"job not created: {err}")
        raise
    return LaunchResult(names, namespace, runs.run_ids, runs.experiment_id)


# -- watching -----------------------------------------------------------------------------------

@dataclass
class PodState:
    name: str
    index: str  # completion index ("" for a plain Job)
    phase: str
    node: str
    detail: str  # waiting/terminated reason, exit code


@dataclass
class JobState:
    name: str
    namespace: str
    state: str  # Pending, Running, Succeeded, Failed, Suspended
    completions: int
    succeeded: int
    failed: int
    active: int
    message: str
    run_ids: list[str]
    tracking_uri: str
    pods: list[PodState]


def _plain(obj: Any) -> dict[str, Any]:
    """A client model or a dict as a plain dict with the API's camelCase keys."""
    if isinstance(obj, dict):
        return obj
    from kubernetes import client

    return client.ApiClient().sanitize_for_serialization(obj)


def _job_state(job: dict[str, Any]) -> tuple[str, str]:
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed",
                                                                 "Suspended"):
            state = {"Complete": "Succeeded"}.get(cond["type"], cond["type"])
            return state, (cond.get("reason", "") + ": " + cond.get("message", "")).strip(": ")
    if status.get("active"):
        return "Running", ""
    return "Pending", ""


def _pod_state(pod: dict[str, Any]) -> PodState:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    detail = ""
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("waiting"):
            detail = state["waiting"].get("reason", "")
        elif state.get("terminated"):
            term = state["terminated"]
            detail = f"{term.get('reason', '')} (exit {term.get('exitCode')})".strip()
    return PodState(name=meta.get("name", ""),
                    index=labels.get("batch.kubernetes.io/job-completion-index", ""),
                    phase=status.get("phase", "Pending"),
                    node=(pod.get("spec") or {}).get("nodeName") or "",
                    detail=detail or status.get("reason", ""))


def _job_pods(cluster: Cluster, name: str, namespace: str) -> list[dict[str, Any]]:
    try:
        pods = cluster.core().list_namespaced_pod(namespace, label_selector=f"job-name={name}")
    except Exception as err:
        raise _api_error(err, f"listing the pods of job {name}") from None
    items = [_plain(p) for p in pods.items]
    # The label selector is applied again here: the answer is only used for this job.
    return [p for p in items if (p.get("metadata", {}).get("labels") or {}).get("job-name") == name]


def _launch_jobs(cluster: Cluster, name: str, namespace: str) -> list[dict[str, Any]]:
    """The Job called ``name``, or else the Jobs of a launch ``name`` (sweep_mode="jobs")."""
    batch = cluster.batch()
    try:
        return [_plain(batch.read_namespaced_job(name, namespace))]
    except Exception as err:
        if getattr(err, "status", None) != 404:
            raise _api_error(err, f"reading job {name} in namespace {namespace}") from None
    try:
        listed = batch.list_namespaced_job(namespace, label_selector=f"{LABEL_LAUNCH}={name}")
    except Exception as err:
        raise _api_error(err, f"listing the jobs of launch {name}") from None
    jobs = [_plain(j) for j in listed.items]
    jobs = [j for j in jobs if (j["metadata"].get("labels") or {}).get(LABEL_LAUNCH) == name]
    if not jobs:
        raise KubernetesError(f"no job or launch {name!r} in namespace {namespace}")
    return sorted(jobs, key=lambda j: j["metadata"]["name"])


def job_status(cluster: Cluster, name: str, namespace: str = "") -> list[JobState]:
    """State of a Job (or of every Job of a launch), with its pods and MLflow runs."""
    namespace = namespace or cluster.namespace
    states = []
    for job in _launch_jobs(cluster, name, namespace):
        meta, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
        annotations = meta.get("annotations") or {}
        state, message = _job_state(job)
        pods = sorted((_pod_state(p) for p in _job_pods(cluster, meta["name"], namespace)),
                      key=lambda p: (p.index.zfill(6), p.name))
        states.append(JobState(
            name=meta["name"], namespace=namespace, state=state,
            completions=spec.get("completions") or 1, succeeded=status.get("succeeded") or 0,
            failed=status.get("failed") or 0, active=status.get("active") or 0,
            message=message, run_ids=json.loads(annotations.get(ANN_RUN_IDS, "[]")),
            tracking_uri=annotations.get(ANN_TRACKING_URI, ""), pods=pods))
    return states


def list_jobs(cluster: Cluster, namespace: str = "") -> list[JobState]:
    """Every Job that k8s-launch created in the namespace (newest first)."""
    namespace = namespace or cluster.namespace
    selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    try:
        listed = cluster.batch().list_namespaced_job(namespace, label_selector=selector)
    except Exception as err:
        raise _api_error(err, f"listing jobs in namespace {namespace}") from None
    jobs = [_plain(j) for j in listed.items]
    jobs = [j for j in jobs
            if (j["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY]
    result = []
    for job in sorted(jobs, key=lambda j: j["metadata"]["name"], reverse=True):
        state, message = _job_state(job)
        status, annotations = job.get("status") or {}, job["metadata"].get("annotations") or {}
        result.append(JobState(
            name=job["metadata"]["name"], namespace=namespace, state=state,
            completions=(job.get("spec") or {}).get("completions") or 1,
            succeeded=status.get("succeeded") or 0, failed=status.get("failed") or 0,
            active=status.get("active") or 0, message=message,
            run_ids=json.loads(annotations.get(ANN_RUN_IDS, "[]")),
            tracking_uri=annotations.get(ANN_TRACKING_URI, ""), pods=[]))
    return result


def pod_logs(cluster: Cluster, name: str, namespace: str = "", *, index: str | None = None,
             follow: bool = False, tail: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(pod, line)`` from the newest pod of each completion index of Job ``name``
    (only ``index`` if given). ``follow`` streams one pod until it ends."""
    namespace = namespace or cluster.namespace
    pods = _job_pods(cluster, name, namespace)
    if index is not None:
        pods = [p for p in pods if (p["metadata"].get("labels") or {})
                .get("batch.kubernetes.io/job-completion-index", "") == str(index)]
    newest: dict[str, dict[str, Any]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        labels = pod["metadata"].get("labels") or {}
        newest[labels.get("batch.kubernetes.io/job-completion-index", "")] = pod
    if not newest:
        where = f" with completion index {index}" if index is not None else ""
        raise KubernetesError(f"job {name} has no pods{where} in namespace {namespace} "
                              "(not started yet, or deleted after its TTL)")
    if follow and len(newest) > 1:
        raise ConfigError(f"job {name} has {len(newest)} pods: give --index to follow one")
    core = cluster.core()
    for key in sorted(newest, key=lambda k: k.zfill(6)):
        pod = newest[key]["metadata"]["name"]
        try:
            response = core.read_namespaced_pod_log(pod, namespace, follow=follow,
                                                    tail_lines=tail, _preload_content=False)
        except Exception as err:
            raise _api_error(err, f"reading the log of pod {pod}") from None
        pending = b""
        for chunk in response.stream(amt=4096, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield pod, line.decode("utf-8", "replace")
        if pending:
            yield pod, pending.decode("utf-8", "replace")


def cancel(cluster: Cluster, name: str, namespace: str = "") -> list[JobState]:
    """Delete a Job (or every Job of a launch) and its pods. The pods get SIGTERM and write a
    checkpoint; the returned states carry the run ids, to mark them KILLED."""
    namespace = namespace or cluster.namespace
    jobs = job_status(cluster, name, namespace)
    batch = cluster.batch()
    for job in jobs:
        try:
            batch.delete_namespaced_job(job.name, namespace, propagation_policy="Background")
        except Exception as err:
            raise _api_error(err, f"deleting job {job.name}") from None
    return jobs
