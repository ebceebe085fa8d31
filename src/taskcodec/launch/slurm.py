"""Slurm: render a job script (pure) | submit, status, log, cancel (locally or over SSH).

The job is always an array, one task per parameter combination of the :class:`JobSpec`, so a
single job and a sweep look the same in ``squeue``, in the log names (``%x-%A_%a.out``) and in
the script. Each task continues one MLflow run that ``slurm-launch`` created before submitting:
the run ids reach the job through ``$TASKCODEC_RUN_IDS`` (Slurm keeps a job's environment across
requeues), so a requeued task resumes its own run from its last checkpoint.

Preemption and time limits, in the rendered script: Slurm sends SIGUSR1 to the batch shell
``signal_grace`` seconds before the time limit (``--signal=B:USR1@...``), and SIGTERM on
``scancel``, ``scontrol requeue`` or preemption. The shell forwards each once to its process
group; the wrappers in between (``mlflow run``, ``bash -c``) ignore both, so only the training
process acts: it writes a checkpoint and exits 75. After a SIGUSR1 the script requeues the job
(``scontrol requeue``; a resubmission if that is refused), so training longer than the maximum
wall time runs as a chain of jobs on one MLflow run. Under ``torchrun`` the elastic agent passes
the signal on to each worker's process group (``TORCHELASTIC_SIGNALS_TO_HANDLE``); inside a
container a small POSIX-sh relay does what the batch shell does on the host.

Credentials for the tracking server are never rendered: jobs inherit them from the environment
``sbatch`` exports, or read them from a mode-0600 file named by ``$TASKCODEC_CREDENTIALS_FILE``.
Every value in the script is ``shlex.quote``d, so a parameter such as ``$(touch x)`` reaches the
training code as that literal string.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskcodec.errors import ConfigError, TaskcodecError
from taskcodec.launch.spec import JobSpec, mlflow_command

#: What ``taskcodec train`` exits with after a checkpoint written on SIGTERM/SIGUSR1.
PREEMPTED_EXIT = 75
#: Marks the jobs slurm-launch submits (``--comment``); followed by JSON: run ids and UI link.
COMMENT_PREFIX = "taskcodec "
DEFAULT_SIGNAL_GRACE = 300
DEFAULT_IMAGE_PROJECT_DIR = "/opt/taskcodec"  # where the training image keeps MLProject

#: Variables whose values must never be written into a script (passed through by name only).
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                   "MLFLOW_TRACKING_INSECURE_TLS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL")
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$|^KEY$|CREDENTIAL", re.IGNORECASE)
#: Passed into containers (``--cleanenv`` drops everything else): tracking, proxies, Slurm.
PASS_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", *CREDENTIAL_VARS,
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
    "SLURM_JOB_NAME", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_PROCID", "SLURM_TMPDIR",
    "SLURM_CPUS_PER_TASK", "CUDA_VISIBLE_DEVICES", "TASKCODEC_IMAGE", "TASKCODEC_GIT_COMMIT",
    "TORCHELASTIC_SIGNALS_TO_HANDLE", "OMP_NUM_THREADS",
)
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT",
              "TIME_LIMIT", "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
RUNTIMES = ("auto", "apptainer", "podman", "docker")

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEMORY = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,:+-]*$")
_DEPENDENCY = re.compile(r"^(?:singleton|[a-z]+(?::\d+(?:_\d+)?(?:\+\d+)?)+)(?:[,?](?:singleton|[a-z]+"
                         r"(?::\d+(?:_\d+)?(?:\+\d+)?)+))*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
JOB_ID = re.compile(r"^\d+(?:_\d+)?$")
_HOST = re.compile(r"^[A-Za-z0-9_.@\[\]:%-]+$")


# -- validation helpers (pure) ------------------------------------------------------------------
def parse_time(text: str) -> int | None:
    """Slurm time limit -> seconds (None for no limit); Slurm's own formats, e.g. ``90``,
    ``1:30:00``, ``2-00:00:00``, ``1-12``. A bare number is minutes, as for ``sbatch --time``."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if not m:
        raise ConfigError(f"--time {text!r} is not a Slurm time (e.g. 90, 1:30:00, 2-00:00:00)")
    days, a, b, c = m.group(1), m.group(2), m.group(3), m.group(4)
    if days is not None:  # days-hours[:minutes[:seconds]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # hours:minutes:seconds
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # minutes:seconds
        seconds = int(a) * 60 + int(b)
    else:  # minutes
        seconds = int(a) * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r} must be longer than zero")
    return seconds


def parse_gpus(text: str | int) -> tuple[str, int]:
    """``"2"`` -> ("", 2); ``"a100:2"`` -> ("a100", 2)."""
    kind, _, count = str(text).strip().rpartition(":")
    try:
        number = int(count)
    except ValueError:
        raise ConfigError(f"--gpus {text!r} is not N or TYPE:N (e.g. 2 or a100:2)") from None
    if number < 0:
        raise ConfigError(f"--gpus {text!r} is out of range: must be >= 0")
    if kind and not re.match(r"^[A-Za-z0-9_.-]+$", kind):
        raise ConfigError(f"--gpus {text!r}: GPU type {kind!r} is not a Slurm gres type")
    return kind, number


def check_tracking_uri(uri: str) -> str:
    """Refuse a URI that carries a password: it would be written into the script."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is not None or (parts.username and parts.scheme.startswith("http")):
        raise ConfigError("the tracking URI holds credentials; put them in MLFLOW_TRACKING_USERNAME"
                          "/MLFLOW_TRACKING_PASSWORD (or a token) instead, they are passed to jobs "
                          "without being written into the script")
    return uri


def _check_line(label: str, value: str) -> None:
    if any(ord(ch) < 32 for ch in value):
        raise ConfigError(f"{label} {value!r} contains a control character")


@dataclass
class SlurmOptions:
    """Slurm-only settings; the launcher-neutral part of a job is the :class:`JobSpec`."""

    account: str = ""
    partition: str = ""
    qos: str = ""
    constraint: str = ""
    output_dir: str = "slurm-logs"     # logs %x-%A_%a.out; relative: to the submission dir
    checkpoint_dir: str = ""           # root of per-run checkpoint folders ("" = engine default)
    depends_on: str = ""               # job ids (afterok) or a Slurm dependency expression
    mail_type: str = ""
    mail_user: str = ""
    signal_grace: int = DEFAULT_SIGNAL_GRACE  # seconds before the time limit: SIGUSR1
    max_parallel: int = 0              # array throttle (%N); 0: no limit
    runtime: str = "auto"              # for --image: apptainer (.sif), podman or docker
    binds: list[str] = field(default_factory=list)   # container binds SRC[:DST]
    setup: list[str] = field(default_factory=list)   # shell lines run first (module load ...)
    stage_data: bool = False           # copy -P data=PATH to node-local scratch first

    def validate(self, spec: JobSpec) -> SlurmOptions:
        for label, value in (("--account", self.account), ("--partition", self.partition),
                             ("--qos", self.qos), ("--mail-user", self.mail_user)):
            if value and not _WORD.match(value.replace("@", "")):
                raise ConfigError(f"{label} {value!r} is not a plain Slurm name")
        if self.constraint:
            _check_line("--constraint", self.constraint)
        if not _JOB_NAME.match(spec.name):
            raise ConfigError(f"--name {spec.name!r} is not a job name (letters, digits, ._+-)")
        if not self.output_dir:
            raise ConfigError("--output-dir must not be empty")
        for label, value in (("--output-dir", self.output_dir),
                             ("--checkpoint-dir", self.checkpoint_dir)):
            _check_line(label, value)
        if self.depends_on and not _DEPENDENCY.match(self.dependency()):
            raise ConfigError(f"--depends-on {self.depends_on!r} is not job ids (123,456) or a "
                              "Slurm dependency (afterok:123, afterany:123:456, singleton)")
        for kind in filter(None, self.mail_type.upper().split(",")):
            if kind not in MAIL_TYPES:
                raise ConfigError(f"--mail-type {kind!r} is not one of: {', '.join(MAIL_TYPES)}")
        if not 1 <= self.signal_grace <= 65535:
            raise ConfigError(f"--signal-grace {self.signal_grace} is out of range: 1..65535 s")
        limit = parse_time(spec.time) if spec.time else None
        if limit is not None and self.signal_grace >= limit:
            raise ConfigError(f"--signal-grace {self.signal_grace} s is not shorter than the time "
                              f"limit --time {spec.time} ({limit} s)")
        if spec.memory and not _MEMORY.match(spec.memory):
            raise ConfigError(f"--memory {spec.memory!r} is not a Slurm size (e.g. 16G, 4000M)")
        if self.max_parallel < 0:
            raise ConfigError(f"--max-parallel {self.max_parallel} is out of range: must be >= 0")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime!r} is not one of: {', '.join(RUNTIMES)}")
        if self.stage_data and spec.params.get("data", "embedded") in ("", "embedded"):
            raise ConfigError("--stage-data needs -P data=PATH (a folder or archive to copy)")
        for bind in self.binds:
            _check_line("--bind", bind)
        for line in self.setup:
            _check_line("--setup", line)
        for name in spec.env:
            if not _ENV_NAME.match(name):
                raise ConfigError(f"--env {name!r} is not a variable name")
            if _SECRET_NAME.search(name):
                raise ConfigError(f"--env {name}: a secret would be written into the job script; "
                                  f"export it and pass it by name with --pass-env {name}")
        for name in spec.pass_env:
            if not _ENV_NAME.match(name):
                raise ConfigError(f"--pass-env {name!r} is not a variable name")
        if spec.tracking_uri:
            check_tracking_uri(spec.tracking_uri)
        if spec.gpu_type and not re.match(r"^[A-Za-z0-9_.-]+$", spec.gpu_type):
            raise ConfigError(f"GPU type {spec.gpu_type!r} is not a Slurm gres type")
        return self

    def dependency(self) -> str:
        dep = self.depends_on.replace(" ", "")
        if re.match(r"^\d+(?:_\d+)?(?:,\d+(?:_\d+)?)*$", dep):
            return "afterok:" + ":".join(dep.split(","))
        return dep

    def container_runtime(self, image: str) -> str:
        if self.runtime != "auto":
            return self.runtime
        return "apptainer" if _is_apptainer_image(image) else "podman"


def _is_apptainer_image(image: str) -> bool:
    return image.endswith((".sif", ".simg")) or image.startswith(("library://", "oras://"))


# -- rendering (pure) ---------------------------------------------------------------------------
def sbatch_flags(spec: JobSpec, options: SlurmOptions) -> dict[str, str | None]:
    """The ``#SBATCH`` flags (``None``: a flag without value), before sorting and quoting."""
    tasks = len(spec.combinations())
    array = (f"0-{tasks - 1}" if tasks > 1 else "0") + (
        f"%{options.max_parallel}" if options.max_parallel else "")
    flags: dict[str, str | None] = {
        "array": array,
        "cpus-per-task": str(spec.cpus),
        "export": "ALL",            # the job inherits the submission environment (credentials)
        "job-name": spec.name,
        "nodes": str(spec.nodes),
        "ntasks-per-node": "1",     # torchrun starts one process per GPU itself
        "open-mode": "append",      # a requeued task adds to its log instead of replacing it
        "output": f"{options.output_dir.rstrip('/')}/%x-%A_%a.out",
        "requeue": None,
        "signal": f"B:USR1@{options.signal_grace}",
    }
    optional = {"account": options.account, "partition": options.partition, "qos": options.qos,
                "constraint": options.constraint, "mem": spec.memory, "time": spec.time,
                "mail-type": options.mail_type.upper(), "mail-user": options.mail_user,
                "dependency": options.dependency() if options.depends_on else ""}
    flags.update({k: v for k, v in optional.items() if v})
    if spec.gpus:
        flags["gres"] = f"gpu:{spec.gpu_type + ':' if spec.gpu_type else ''}{spec.gpus}"
    return flags


def _flag_line(key: str, value: str | None) -> str:
    return f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={shlex.quote(value)}"


def _q(values: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(v)) for v in values)


# Inside a container: the POSIX-sh twin of the batch shell's forwarding (ignore in the child,
# forward each signal once to the own process group, return the child's status).
RELAY = ('trap "" USR1 TERM; "$@" & c=$!; '
         'f() { trap "" "$1"; kill -s "$1" 0 2>/dev/null; }; trap "f USR1" USR1; trap "f TERM" TERM; '
         'while :; do wait "$c"; s=$?; kill -0 "$c" 2>/dev/null || break; done; '
         'wait "$c" 2>/dev/null; l=$?; [ "$l" != 127 ] && s=$l; exit "$s"')
# torchrun workers: mlflow's wrappers ignore the signals, the training process handles them.
_IGNORE = 'trap "" USR1 TERM; exec "$@"'


def render_sbatch(spec: JobSpec, options: SlurmOptions, *, project_dir: str = "") -> str:
    """The complete sbatch script for ``spec``: a pure function of its arguments.

    ``project_dir`` is where MLProject lives on the compute side (``spec.project_dir``, else
    ``/opt/taskcodec`` in an image, else the current directory of the job).
    """
    project = project_dir or spec.project_dir or (DEFAULT_IMAGE_PROJECT_DIR if spec.image else ".")
    flags = sbatch_flags(spec, options)
    combos = spec.combinations()
    staged_data = spec.params.get("data", "") if options.stage_data else ""
    lines = ["#!/bin/bash"]
    lines += [_flag_line(k, flags[k]) for k in sorted(flags)]
    lines += [
        "#",
        f"# Rendered by slurm-launch: MLflow entry point {spec.entry_point!r}, "
        + (f"{len(combos)} array tasks, each continuing its own MLflow run."
           if len(combos) > 1 else "1 array task continuing one MLflow run."),
        "# $TASKCODEC_RUN_IDS (set at submission, kept by Slurm across requeues) holds the run ids,",
        "# so a requeued task continues its own run from its last checkpoint. Credentials are not",
        "# written here: they come from the exported environment or $TASKCODEC_CREDENTIALS_FILE.",
        "set -uo pipefail",
        "",
        "task=${SLURM_ARRAY_TASK_ID:-0}",
        "case $task in",
    ]
    for index, combo in enumerate(combos):
        if staged_data:
            combo = {k: v for k, v in combo.items() if k != "data"}
        argv = mlflow_command(spec.entry_point, combo, project, spec.experiment)
        lines.append(f"  {index}) cmd=({_q(argv)}) ;;")
    lines += [
        '  *) echo "taskcodec: array task $task has no parameters in this script" >&2; exit 2 ;;',
        "esac",
        'read -r -a run_ids <<< "${TASKCODEC_RUN_IDS:-}"',
        "run_id=${run_ids[$task]:-}",
        'if [[ -n $run_id ]]; then cmd+=(--run-id "$run_id"); else',
        '  echo "taskcodec: no MLflow run id for array task $task (submit with slurm-launch):'
        ' mlflow creates a new run" >&2',
        "fi",
        "",
    ]
    lines += _environment_lines(spec)
    if options.setup:
        lines += ["# Set-up lines from the launch options, run as written:", *options.setup, ""]
    if spec.venv:
        lines += [f"source {shlex.quote(spec.venv.rstrip('/') + '/bin/activate')} || exit 1", ""]
    binds: list[str] = []
    if options.checkpoint_dir:
        lines += [f"ckpt_root={shlex.quote(options.checkpoint_dir)}",
                  '[[ $ckpt_root == /* ]] || ckpt_root=$PWD/$ckpt_root',
                  'ckpt_dir=$ckpt_root/${run_id:-job-${SLURM_JOB_ID:-$$}}',
                  'mkdir -p "$ckpt_dir" || exit 1',
                  'cmd+=(-P "checkpoint_dir=$ckpt_dir")', ""]
        binds.append('"$ckpt_dir"')
    if staged_data:
        lines += ["# Copy the data set to node-local scratch once per job start.",
                  'stage_dir=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/taskcodec-data-${SLURM_JOB_ID:-$$}',
                  f"data_src={shlex.quote(staged_data.rstrip('/'))}",
                  'mkdir -p "$stage_dir" && cp -a -- "$data_src" "$stage_dir/" || '
                  '{ echo "taskcodec: cannot copy $data_src to $stage_dir" >&2; exit 1; }',
                  'cmd+=(-P "data=$stage_dir/${data_src##*/}")', ""]
        binds.append('"$stage_dir"')
    lines += _launcher_lines(spec, options, binds)
    lines += _supervise_lines(in_container=bool(spec.image))
    return "\n".join(lines) + "\n"


def _environment_lines(spec: JobSpec) -> list[str]:
    lines = []
    exports = {}
    if spec.tracking_uri:
        exports["MLFLOW_TRACKING_URI"] = spec.tracking_uri
    if spec.experiment:
        exports["MLFLOW_EXPERIMENT_NAME"] = spec.experiment
    if spec.image:
        exports["TASKCODEC_IMAGE"] = spec.image
    if spec.world_size > 1:  # torchrun passes these on to its workers' process groups
        exports["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    # One thread per CPU Slurm gave each process, not one per core of the node.
    exports["OMP_NUM_THREADS"] = str(max(1, spec.cpus // max(spec.gpus, 1)))
    exports.update(spec.env)
    lines += [f"export {name}={shlex.quote(exports[name])}" for name in sorted(exports)]
    lines += [
        'if [[ -n ${TASKCODEC_CREDENTIALS_FILE:-} ]]; then  # KEY=VALUE lines, mode 0600',
        '  set -a; source "$TASKCODEC_CREDENTIALS_FILE" || exit 1; set +a',
        "fi",
        "",
    ]
    return lines


def _launcher_lines(spec: JobSpec, options: SlurmOptions, binds: list[str]) -> list[str]:
    """Wrap ``cmd`` in torchrun (more than one process), a container and srun (several nodes)."""
    lines = []
    if spec.world_size > 1:
        per_node = max(spec.gpus, 1)
        if spec.nodes > 1:
            lines += ['head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                      "port=$((20000 + SLURM_JOB_ID % 20000))",
                      f'dist=(torchrun --nnodes={spec.nodes} --nproc-per-node={per_node} '
                      '--rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID")']
        else:
            lines += [f"dist=(torchrun --standalone --nnodes=1 --nproc-per-node={per_node})"]
        lines += [f'cmd=("${{dist[@]}}" --no-python sh -c {shlex.quote(_IGNORE)} sh "${{cmd[@]}}")']
    if spec.image:
        names = sorted(set(PASS_ENV) | set(spec.pass_env) | set(spec.env))
        lines += [f"pass_env=({_q(names)})"]
        runtime = options.container_runtime(spec.image)
        if runtime == "apptainer":
            user_binds = _q(options.binds)
            lines += [
                "runtime=apptainer; command -v apptainer >/dev/null || runtime=singularity",
                'for name in "${pass_env[@]}"; do  # --cleanenv: only these get in (values not rendered)',
                '  [[ -n ${!name+set} ]] && export "APPTAINERENV_$name=${!name}" '
                '"SINGULARITYENV_$name=${!name}"',
                "done",
                "binds=()",
                f'for path in {" ".join(binds)} ${{SLURM_TMPDIR:-}} {user_binds}; do '
                'binds+=(--bind "$path"); done',
                f'cmd=("$runtime" exec{" --nv" if spec.gpus else ""} --cleanenv "${{binds[@]}}" '
                f'{shlex.quote(spec.image)} sh -c {shlex.quote(RELAY)} relay "${{cmd[@]}}")',
            ]
        else:
            gpu_flags = "--device nvidia.com/gpu=all " if runtime == "podman" else "--gpus all "
            user_binds = " ".join(f'-v {shlex.quote(b)}' for b in options.binds)
            lines += [
                'envs=(); for name in "${pass_env[@]}"; do envs+=(-e "$name"); done'
                "  # values come from this environment",
                "binds=()",
                f'for path in {" ".join(binds)} ${{SLURM_TMPDIR:-}}; do binds+=(-v "$path:$path"); done',
                f'cmd=({runtime} run --rm --network=host --name "taskcodec-${{SLURM_JOB_ID:-$$}}" '
                f'{gpu_flags if spec.gpus else ""}"${{envs[@]}}" "${{binds[@]}}" '
                f'{user_binds + " " if user_binds else ""}'
                f'{shlex.quote(spec.image)} sh -c {shlex.quote(RELAY)} relay "${{cmd[@]}}")',
            ]
    if spec.nodes > 1:
        lines += ['cmd=(srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 '
                  '"${cmd[@]}")']
    return lines + [""] if lines else lines


def _supervise_lines(in_container: bool) -> list[str]:
    start = ('"${cmd[@]}" &' if in_container  # the runtime forwards signals to the relay
             else "( trap '' USR1 TERM; exec \"${cmd[@]}\" ) &")
    return [
        "# Forward SIGUSR1 (time limit near) and SIGTERM (cancel, requeue, preemption) once to the",
        "# process group; the training process checkpoints and exits 75, the wrappers ignore both.",
        "requeue=0",
        'forward() { trap "" "$1"; kill -s "$1" 0 2>/dev/null; echo "taskcodec: SIG$1 forwarded" >&2; }',
        "trap 'requeue=1; forward USR1' USR1",
        "trap 'forward TERM' TERM",
        'printf "taskcodec: job %s task %s run %s on %s:" "${SLURM_JOB_ID:-}" "$task" '
        '"${run_id:-new}" "$(hostname)" >&2; printf " %q" "${cmd[@]}" >&2; echo >&2',
        start,
        "child=$!",
        'while :; do wait "$child"; status=$?; kill -0 "$child" 2>/dev/null || break; done',
        'wait "$child" 2>/dev/null; last=$?; (( last != 127 )) && status=$last',
        "if (( requeue && status != 0 )); then",
        '  echo "taskcodec: time limit near: requeueing job $SLURM_JOB_ID to continue run ${run_id:-?}" >&2',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '  echo "taskcodec: requeue refused: resubmitting array task $task" >&2',
        '  sbatch --array="$task" "$0" && exit 0',
        "fi",
        'exit "$status"',
    ]


# -- talking to the cluster: local or over SSH --------------------------------------------------
class SlurmError(TaskcodecError):
    """A Slurm command failed or could not be run (names the command and its message)."""


@dataclass
class JobInfo:
    """One array task (or a pending range of tasks) as ``slurm-status`` shows it."""

    job_id: str            # "123_4" (or "123_[5-9]" for tasks not started yet)
    name: str
    state: str
    elapsed: str
    where: str             # node list, or the reason it waits
    run_id: str = ""
    link: str = ""
    stdout: str = ""


class Cluster:
    """Runs Slurm commands on this machine or, with ``host``, over SSH (the user's own ssh
    configuration and keys; ``ssh_options`` are added before the host)."""

    def __init__(self, host: str = "", ssh_options: Sequence[str] = (), timeout: float = 60) -> None:
        if host and (host.startswith("-") or not _HOST.match(host)):
            raise ConfigError(f"--host {host!r} is not an SSH host name")
        self.host = host
        self.ssh_options = list(ssh_options)
        self.timeout = timeout

    def argv(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """The local argv that runs ``command`` (with ``env`` added) here or on the host."""
        if not self.host:
            return list(command)
        prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []
        return ["ssh", *self.ssh_options, "--", self.host, shlex.join([*prefix, *command])]

    def run(self, command: Sequence[str], *, input: str | None = None,
            env: Mapping[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        local_env = {**os.environ, **(env or {})} if not self.host else None
        try:
            done = subprocess.run(self.argv(command, env), input=input, capture_output=True,
                                  text=True, env=local_env, timeout=self.timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            where = "ssh" if self.host else command[0]
            raise SlurmError(f"{where} not found: is Slurm installed here (or use --host LOGIN)?") \
                from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{command[0]} did not answer within {self.timeout:.0f} s"
                             f"{' on ' + self.host if self.host else ''}") from None
        if check and done.returncode != 0:
            message = (done.stderr.strip() or done.stdout.strip()).splitlines()
            where = f" on {self.host}" if self.host else ""
            raise SlurmError(f"{command[0]}{where} failed (exit {done.returncode}): "
                             f"{message[-1] if message else 'no message'}")
        return done

    # -- submit ---------------------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        self.run(["mkdir", "-p", "--", path])

    def write_private(self, path: str, text: str) -> str:
        """Write a file readable by the user only (mode 0600); returns its absolute path.
        A relative ``path`` is taken from the user's home (here or on the host)."""
        script = ('cd && umask 077 && mkdir -p "$(dirname "$1")" && cat > "$1" && chmod 600 "$1" '
                  '&& readlink -f "$1"')
        return self.run(["sh", "-c", script, "sh", path], input=text).stdout.strip()

    def submit(self, script: str, *, env: Mapping[str, str], comment: str = "") -> str:
        """``sbatch --parsable`` with the script on stdin; returns the job id."""
        command = ["sbatch", "--parsable"] + ([f"--comment={comment}"] if comment else [])
        done = self.run(command, input=script, env=env)
        job_id = done.stdout.strip().split(";")[0]
        if not JOB_ID.match(job_id):
            raise SlurmError(f"sbatch printed no job id: {done.stdout.strip()!r}")
        return job_id

    # -- watch ----------------------------------------------------------------------------------
    def jobs(self, *, all_users: bool = False, all_jobs: bool = False) -> list[JobInfo]:
        """The user's taskcodec jobs from ``squeue --json`` (``all_jobs``: not only taskcodec's)."""
        command = ["squeue", "--json"] + ([] if all_users else ["--me"])
        data = json.loads(self.run(command).stdout or "{}")
        return parse_squeue(data, all_jobs=all_jobs)

    def cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            if not JOB_ID.match(job_id):
                raise ConfigError(f"{job_id!r} is not a Slurm job id (123 or 123_4)")
        self.run(["scancel", *job_ids])

    def log_files(self, job_id: str, output_dir: str = "") -> list[str]:
        """The output files of a job (all its array tasks) or of one task (``123_4``)."""
        if not JOB_ID.match(job_id):
            raise ConfigError(f"{job_id!r} is not a Slurm job id (123 or 123_4)")
        files = []
        shown = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if shown.returncode == 0:
            for line in shown.stdout.splitlines():
                m = re.search(r"\bStdOut=(.*?)(?= \w+=|$)", line)
                if m and m.group(1) not in files:
                    files.append(m.group(1))
        if not files and output_dir:  # finished long ago: look for %x-%A_%a.out by name
            array_id, _, task = job_id.partition("_")
            pattern = f"*-{array_id}_{task or '*'}.out"
            found = self.run(["sh", "-c", 'cd "$1" 2>/dev/null && ls -1 -- $2', "sh",
                              output_dir, pattern], check=False)
            files = [f"{output_dir.rstrip('/')}/{name}" for name in found.stdout.split("\n") if name]
        return sorted(files, key=_task_order)

    def read(self, path: str) -> str:
        done = self.run(["cat", "--", path], check=False)
        if done.returncode != 0:
            raise SlurmError(f"cannot read {path}{' on ' + self.host if self.host else ''}: "
                             f"{done.stderr.strip() or 'no such file'}")
        return done.stdout

    def follow_argv(self, paths: Sequence[str]) -> list[str]:
        """The argv that prints the files and follows them as they grow (Ctrl-C stops)."""
        return self.argv(["tail", "-n", "+1", "-F", "--", *paths])


def _task_order(path: str) -> tuple[int, str]:
    m = re.search(r"_(\d+)\.out$", path)
    return (int(m.group(1)) if m else -1, path)


def _number(value: Any) -> int | None:
    """squeue --json numbers are plain in Slurm 22.05 and {"set", "number"} objects later."""
    if isinstance(value, dict):
        return value.get("number") if value.get("set", True) else None
    return value if isinstance(value, int) else None


def _duration(seconds: int) -> str:
    days, rest = divmod(max(seconds, 0), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def parse_comment(comment: str) -> dict[str, Any]:
    """The JSON that slurm-launch put after ``taskcodec `` in the job's comment ({} otherwise)."""
    if not comment.startswith(COMMENT_PREFIX):
        return {}
    try:
        value = json.loads(comment[len(COMMENT_PREFIX):])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def make_comment(run_ids: Sequence[str], links: Sequence[str]) -> str:
    return COMMENT_PREFIX + json.dumps({"runs": list(run_ids), "links": list(links)},
                                       separators=(",", ":"))


def parse_squeue(data: Mapping[str, Any], *, all_jobs: bool = False,
                 now: float | None = None) -> list[JobInfo]:
    """``squeue --json`` output -> one :class:`JobInfo` per array task (pure)."""
    now = time.time() if now is None else now
    rows = []
    for job in data.get("jobs", []):
        comment = job.get("comment") or ""
        meta = parse_comment(comment)
        if not meta and not all_jobs:
            continue
        state = job.get("job_state") or ""
        state = state[0] if isinstance(state, list) and state else str(state)
        task = _number(job.get("array_task_id"))
        array_id = _number(job.get("array_job_id")) or 0
        pending = _expand_tasks(job.get("array_task_string") or "")
        if task is None and array_id and pending:
            # Tasks not yet started are one squeue record ("12_[0-3]"): list each with its run.
            for index in pending:
                rows += parse_squeue({"jobs": [{**job, "array_task_id": index,
                                                "array_task_string": ""}]},
                                     all_jobs=all_jobs, now=now)
            continue
        if task is not None and array_id:
            job_id = f"{array_id}_{task}"
        elif job.get("array_task_string"):
            job_id = f"{array_id or job.get('job_id')}_[{job['array_task_string']}]"
        else:
            job_id = str(job.get("job_id"))
        start = _number(job.get("start_time")) or 0
        elapsed = _duration(int(now - start)) if state in ("RUNNING", "COMPLETING") and start else "-"
        where = job.get("nodes") or "" if state in ("RUNNING", "COMPLETING") else ""
        if not where:
            reason = job.get("state_reason") or ""
            where = f"({reason})" if reason and reason != "None" else ""
        runs, links = meta.get("runs") or [], meta.get("links") or []
        run_id = runs[task] if task is not None and task < len(runs) else ""
        link = links[task] if task is not None and task < len(links) else ""
        rows.append(JobInfo(job_id=job_id, name=job.get("name") or "", state=state,
                            elapsed=elapsed, where=where, run_id=run_id, link=link,
                            stdout=job.get("standard_output") or ""))
    return sorted(rows, key=lambda r: _job_sort_key(r.job_id))


def _expand_tasks(text: str) -> list[int] | None:
    """Slurm's array task string ("0-3", "0,2,5-7", "0-9:2%4") as task ids; None if unknown."""
    text = text.split("%", 1)[0].strip()
    if not text:
        return None
    tasks: list[int] = []
    for part in text.split(","):
        span, _, step = part.partition(":")
        first, _, last = span.partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or (step and not step.isdigit()):
            return None
        tasks += range(int(first), int(last or first) + 1, int(step or 1))
    return tasks if len(tasks) <= 10_000 else None


def _job_sort_key(job_id: str) -> tuple[int, int]:
    array_id, _, task = job_id.partition("_")
    return (int(array_id) if array_id.isdigit() else 0,
            int(task) if task.isdigit() else 1 << 30)


def format_jobs(rows: Sequence[JobInfo], links: bool = True) -> str:
    """A plain table: JOB, NAME, STATE, ELAPSED, NODES/REASON, MLFLOW RUN (and its link)."""
    header = ["JOB", "NAME", "STATE", "ELAPSED", "NODES/REASON", "MLFLOW RUN"]
    table = [[r.job_id, r.name, r.state, r.elapsed, r.where,
              (r.link or r.run_id or "-") if links else (r.run_id or "-")] for r in rows]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *table])


# -- MLflow runs created at launch time (mlflow imported only here) -----------------------------
def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run, for an HTTP tracking server ("" otherwise)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


@dataclass
class LaunchedRuns:
    run_ids: list[str]
    links: list[str]
    experiment_id: str


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def create_runs(spec: JobSpec, *, tags: Mapping[str, str]) -> LaunchedRuns:
    """One SCHEDULED run per array task, with its parameters and ``tags``; or, with
    ``spec.run_id``, that existing run set back to SCHEDULED."""
    from mlflow.entities import Param, RunTag

    from taskcodec.tracking import check_reachable

    check_reachable(spec.tracking_uri)
    client = _client(spec.tracking_uri)
    if spec.run_id:
        run = client.get_run(spec.run_id)
        experiment_id = run.info.experiment_id
        client.set_tag(spec.run_id, "slurm.relaunched", "true")
        for key, value in tags.items():
            client.set_tag(spec.run_id, key, value)
        client.update_run(spec.run_id, status="SCHEDULED")
        return LaunchedRuns([spec.run_id], [ui_link(spec.tracking_uri, experiment_id, spec.run_id)],
                            experiment_id)
    experiment = client.get_experiment_by_name(spec.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(spec.experiment))
    run_ids, links = [], []
    for index, combo in enumerate(spec.combinations()):
        swept = ",".join(f"{k}={combo[k]}" for k in sorted(spec.sweep))
        name = f"{spec.name}-{index}" + (f" {swept}" if swept else "")
        run = client.create_run(experiment_id, run_name=name, tags={
            **tags, "entry_point": spec.entry_point, "mlflow.project.entryPoint": spec.entry_point,
            "slurm_array_task_id": str(index), **({"sweep": swept} if swept else {})})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(combo.items())],
                         tags=[RunTag("launcher", "slurm")])
        client.update_run(run_id, status="SCHEDULED")
        run_ids.append(run_id)
        links.append(ui_link(spec.tracking_uri, experiment_id, run_id))
    return LaunchedRuns(run_ids, links, experiment_id)


def tag_submitted(spec: JobSpec, runs: LaunchedRuns, job_id: str, script: str,
                  host: str = "") -> None:
    """Tie each run to its array task and keep the rendered script as an artifact."""
    client = _client(spec.tracking_uri)
    for index, run_id in enumerate(runs.run_ids):
        task = 0 if spec.run_id else index
        client.set_tag(run_id, "slurm_array_job_id", job_id)
        client.set_tag(run_id, "slurm_job", f"{job_id}_{task}")
        if host:
            client.set_tag(run_id, "slurm_host", host)
        client.log_text(run_id, script, "slurm/job.sh")


def discard_runs(spec: JobSpec, runs: LaunchedRuns, reason: str) -> None:
    """Runs of a launch whose submission failed: marked FAILED with the reason, then deleted."""
    client = _client(spec.tracking_uri)
    for run_id in runs.run_ids:
        try:
            client.set_tag(run_id, "launch_error", reason[:500])
            client.set_terminated(run_id, "FAILED")
            if not spec.run_id:
                client.delete_run(run_id)
        except Exception:  # best effort: the submission error is what the user must see
            pass


def relaunch_settings(spec: JobSpec, known: set[str]) -> tuple[dict[str, str], str]:
    """For ``--run-id``: the parameters the run was started with (the user's -P win) and the
    name of its experiment (``mlflow run --run-id`` must name the run's own experiment)."""
    client = _client(spec.tracking_uri)
    try:
        run = client.get_run(spec.run_id)
    except Exception as err:
        raise ConfigError(f"--run-id {spec.run_id}: no such run at {spec.tracking_uri} "
                          f"({str(err).splitlines()[0][:120]})") from None
    skip = {"resume", "run_name", "checkpoint_dir"}
    kept = {k: v for k, v in run.data.params.items() if k in known and k not in skip and v != ""}
    experiment = client.get_experiment(run.info.experiment_id).name
    return {**kept, **spec.params}, experiment


def git_commit(path: Path) -> str:
    from taskcodec.tracking import git_commit as commit_of

    return commit_of(path) or ""
