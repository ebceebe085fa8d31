"""Slurm, rendering: a :class:`JobSpec` and :class:`SlurmOptions` become one sbatch script, a
pure function of its arguments (golden-tested in tests/golden/slurm_*.sh).

The job is always an array, one task per parameter combination of the :class:`JobSpec`, so a
single job and a sweep look the same in ``squeue``, in the log names (``%x-%A_%a.out``) and in
the script. Each task continues one MLflow run that the launch created before submitting: the
run ids reach the job through ``$TASKCODEC_RUN_IDS`` (Slurm keeps a job's environment across
requeues), so a requeued task resumes its own run from its last checkpoint.

Preemption and time limits, in the rendered script: Slurm sends SIGUSR1 to the batch shell
``signal_grace`` seconds before the time limit (``--signal=B:USR1@...``), and SIGTERM on
``scancel``, ``scontrol requeue`` or preemption. The shell forwards each once to its process
group; the wrappers in between (``mlflow run``, ``bash -c``) ignore both, so only the training
process acts: it writes a checkpoint and exits 75 (``signals.PREEMPTED_EXIT``). After a SIGUSR1
the script requeues the job (``scontrol requeue``; a resubmission if that is refused), so
training longer than the maximum wall time runs as a chain of jobs on one MLflow run. Under
``torchrun`` the elastic agent passes the signal on to each worker's process group
(``TORCHELASTIC_SIGNALS_TO_HANDLE``); inside a container a small POSIX-sh relay does what the
batch shell does on the host.

Credentials for the tracking server are never rendered: jobs inherit them from the environment
``sbatch`` exports, or read them from a mode-0600 file named by ``$TASKCODEC_CREDENTIALS_FILE``.
Every value in the script is ``shlex.quote``d, so a parameter such as ``$(touch x)`` reaches the
training code as that literal string.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from taskcodec.errors import ConfigError
from taskcodec.launch.checks import TRACKING_CREDENTIALS, parse_time
from taskcodec.launch.spec import JobSpec, mlflow_command

DEFAULT_SIGNAL_GRACE = 300
DEFAULT_IMAGE_PROJECT_DIR = "/opt/taskcodec"  # where the training image keeps MLProject

#: Variables whose values must never be written into a script (passed through by name only).
CREDENTIAL_VARS = (*TRACKING_CREDENTIALS,
                   "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                   "MLFLOW_TRACKING_INSECURE_TLS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL")
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

_MEMORY = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,:+-]*$")
_DEPENDENCY = re.compile(r"^(?:singleton|[a-z]+(?::\d+(?:_\d+)?(?:\+\d+)?)+)(?:[,?](?:singleton|[a-z]+"
                         r"(?::\d+(?:_\d+)?(?:\+\d+)?)+))*$")


# -- validation helpers (pure) ------------------------------------------------------------------
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
    exports.update(spec.job_env())
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
        names = sorted(set(PASS_ENV) | set(spec.pass_env) | set(spec.job_env()))
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
