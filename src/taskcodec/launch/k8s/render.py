"""Kubernetes, rendering: a :class:`JobSpec` and :class:`K8sOptions` become ``batch/v1`` Jobs
running the entry point in the training image (``docker/Dockerfile``); a pure function of its
arguments (golden-tested in tests/golden/k8s-*.yaml). :func:`validate` refuses, before anything
is sent, everything a user can get wrong.

A sweep is one Indexed Job (one MLflow run per completion index; the pod picks its command by
``$JOB_COMPLETION_INDEX``) or one Job per combination. Preemption: a pod stopped by SIGTERM
checkpoints and exits 75 (``signals.PREEMPTED_EXIT``, see :mod:`taskcodec.launch.mlflow_run`);
the Job's pod failure policy retries it without spending the backoff limit, and the new pod
resumes the same MLflow run from the checkpoint on the volume (``checkpoint_dir`` is put there)
or from the run's artifacts.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import yaml

from taskcodec import __version__
from taskcodec.errors import ConfigError
from taskcodec.launch.checks import (
    PREEMPTED_EXIT,
    check_credential_names,
    check_env_names,
    parse_duration,
    parse_quantity,
)
from taskcodec.launch.spec import JobSpec, mlflow_command

IMAGE_PROJECT_DIR = "/opt/taskcodec"  # where docker/Dockerfile puts MLProject and the code
IMAGE_UID = 1000  # the image's non-root user (and group)
DEFAULT_IMAGE = f"taskcodec:{__version__}"
DEFAULT_MOUNT = "/mnt/taskcodec"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on GPU nodes by NVIDIA GPU feature discovery
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
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


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

def _check_memory(text: str, option: str) -> Decimal:
    value = parse_quantity(text, option)
    if value < 2 ** 20:
        raise ConfigError(f"{option} {text!r} is less than one mebibyte "
                          "(memory is in bytes: did you mean Mi or Gi?)")
    return value


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
    """Variables and the tracking server: a credential only ever as a secretKeyRef (the values
    of --env and --pass-env are written into the manifest)."""
    if spec.tracking_uri and not spec.tracking_uri.startswith(TRACKING_SCHEMES):
        raise ConfigError(f"tracking URI {spec.tracking_uri!r} is not a server the pods can "
                          "reach (use http://, https:// or databricks)")
    check_credential_names("--pass-env", spec.pass_env)
    check_env_names("--secret-env", opts.secret_env)
    parse_secret_env(opts.secret_env)
    both = (set(spec.env) | set(spec.pass_env)) & set(opts.secret_env)
    if both:
        raise ConfigError(f"{', '.join(sorted(both))} given both with --env/--pass-env and "
                          "--secret-env")


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


def unmounted_paths(spec: JobSpec, opts: K8sOptions) -> list[str]:
    """Warnings for ``-P``/``--sweep`` values naming a path under /mnt that no volume is mounted
    at (a pod would fail after scheduling, for example ``data=cityscapes:/mnt/datasets/x`` with
    the claim mounted at the default /mnt/taskcodec)."""
    mounts = [opts.mount_path.rstrip("/")] if opts.volume_claim else []
    where = (f"--volume-claim {opts.volume_claim} is mounted at {opts.mount_path} (--mount-path)"
             if opts.volume_claim else "no --volume-claim is mounted")
    warnings = []
    for combo in spec.combinations():
        for name in sorted(combo):
            for path in re.findall(r"(?<![\w.])/mnt(?:/[^\s,:;]*)?", combo[name]):
                if not any(path == m or path.startswith(m + "/") for m in mounts):
                    line = (f"warning: -P {name}={combo[name]}: {path} is outside every mounted "
                            f"path ({where}): the pods will not find it")
                    if line not in warnings:
                        warnings.append(line)
    return warnings


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


def index_script(commands: list[list[str]]) -> str:
    """The shell script of an Indexed Job: the pod runs the command of its completion index."""
    lines = ['case "$JOB_COMPLETION_INDEX" in']
    for index, argv in enumerate(commands):
        lines.append(f"  {index}) exec {shlex.join(argv)} ;;")
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
    literal = spec.job_env(also_given=opts.secret_env)
    for name in sorted(literal):
        env.append({"name": name, "value": literal[name]})
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
