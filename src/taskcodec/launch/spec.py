"""The job description both launchers share: which MLflow entry point, with which
parameters, swept over what, on which resources, in which runtime; and the rules that hold
for any launcher (known parameters, ``--run-id`` continues one run so never with ``--sweep``,
variable names, no credential written into a job, the speed switches a GPU job runs with).

Pure and torch-free: it is validated on the user's laptop before anything is submitted.
Entry points and their declared parameters come from the project's ``MLProject``; a parameter
that neither the entry point declares nor its config knows is refused (a typo would otherwise
reach the cluster and fail there, minutes later).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from taskcodec.errors import ConfigError
from taskcodec.launch.checks import check_credential_names, check_env_names, check_tracking_uri

# The repository root (holds MLProject) for an editable install; $TASKCODEC_PROJECT_DIR wins.
PROJECT_DIR = Path(os.environ.get("TASKCODEC_PROJECT_DIR") or Path(__file__).resolve().parents[3])
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: The training loop's speed switches (:mod:`taskcodec.speed`): settings of every training
#: entry point, which the launchers also take as options (``--precision bf16`` is
#: ``-P precision=bf16``).
SPEED_SWITCHES = ("precision", "tf32", "compile", "channels_last")
#: What a GPU job (``--gpus`` > 0) of a training entry point runs with unless the user sets it
#: (``-P``, ``--sweep`` or the option): precision auto (bf16 autocast on a GPU that has bf16
#: units, the entropy models staying fp32; fp32 on older GPUs and on a CPU, where bf16 is
#: emulated and an order of magnitude slower: BENCHMARKS 7) and TF32. They are written into the
#: job's command; the run's tag ``precision_used`` says what ran. Not for ``-P device=cpu``.
#: compile and channels_last keep the trainer's defaults (compile=auto compiles on a GPU, but
#: not a short run that ends up on a CPU).
GPU_SWITCHES = {"precision": "auto", "tf32": "true"}


def _config_fields(entry_point: str) -> set[str]:
    """Settings the entry point's config accepts beyond MLProject's declared parameters."""
    from taskcodec import config

    classes = {cls.entry_point: cls for cls in vars(config).values()
               if isinstance(cls, type) and issubclass(cls, config.Config)
               and cls is not config.Config}
    cls = classes.get(entry_point)
    return {f.name for f in cls.fields()} if cls else set()


def known_params(entry_point: str, project_dir: Path = PROJECT_DIR) -> set[str]:
    """Every parameter the entry point takes: MLProject's declared ones and its config's."""
    return set(load_entry_points(project_dir).get(entry_point, {})) | _config_fields(entry_point)


def load_entry_points(project_dir: Path = PROJECT_DIR) -> dict[str, dict[str, Any]]:
    """Entry point name -> its declared parameters (name -> {type, default}) from MLProject."""
    path = Path(project_dir) / "MLProject"
    if not path.is_file():
        raise ConfigError(f"no MLProject in {project_dir}")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {name: dict((ep or {}).get("parameters") or {})
            for name, ep in (doc.get("entry_points") or {}).items()}


def parse_assignments(items: Sequence[str], option: str = "-P") -> dict[str, str]:
    """``["lmbda=0.01", "codec=x"]`` -> dict; a clear error for anything without ``=``."""
    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise ConfigError(f"{option} {item!r} is not NAME=VALUE")
        if name in result:
            raise ConfigError(f"{option} {name} is given twice")
        result[name] = value
    return result


def parse_sweep(items: Sequence[str]) -> dict[str, list[str]]:
    """``["lmbda=0.01,0.02"]`` -> {"lmbda": ["0.01", "0.02"]}."""
    sweep = {}
    for name, values in parse_assignments(items, "--sweep").items():
        choices = [v.strip() for v in values.split(",")]
        if not all(choices):
            raise ConfigError(f"--sweep {name}={values!r} has an empty value")
        sweep[name] = choices
    return sweep


@dataclass
class JobSpec:
    entry_point: str
    params: dict[str, str] = field(default_factory=dict)
    sweep: dict[str, list[str]] = field(default_factory=dict)
    name: str = "taskcodec"
    experiment: str = ""
    tracking_uri: str = ""
    run_id: str = ""            # continue this MLflow run (requeue / relaunch)
    nodes: int = 1
    gpus: int = 0               # per node
    gpu_type: str = ""          # e.g. "a100"
    cpus: int = 2               # per task
    memory: str = ""            # e.g. "16G" (launcher-specific syntax is checked there)
    time: str = ""              # Slurm-style time limit, e.g. "1-00:00:00"
    image: str = ""             # container image (or .sif)
    venv: str = ""              # Python environment path
    env: dict[str, str] = field(default_factory=dict)       # literal variables, written in the job
    # Variables the job gets with the value they have here at launch (refused if unset here):
    # Slurm passes them without writing them; Kubernetes writes them into the manifest, so
    # there a credential-looking name is refused (see checks.check_credential_names).
    pass_env: list[str] = field(default_factory=list)
    project_dir: str = ""       # where MLProject lives on the compute side

    def validate(self, project_dir: Path = PROJECT_DIR) -> JobSpec:
        entry_points = load_entry_points(project_dir)
        if self.entry_point not in entry_points:
            raise ConfigError(f"unknown entry point {self.entry_point!r} "
                              f"(MLProject has: {', '.join(sorted(entry_points))})")
        known = known_params(self.entry_point, project_dir)
        for source, names in (("-P", self.params), ("--sweep", self.sweep)):
            for name in names:
                if name not in known:
                    raise ConfigError(f"{source} {name}: entry point {self.entry_point!r} has no "
                                      f"parameter {name!r} (known: {', '.join(sorted(known))})")
        both = set(self.params) & set(self.sweep)
        if both:
            raise ConfigError(f"{', '.join(sorted(both))} given both with -P and --sweep")
        for label, value, low in (("nodes", self.nodes, 1), ("gpus", self.gpus, 0),
                                  ("cpus", self.cpus, 1)):
            if value < low:
                raise ConfigError(f"--{label} {value} is out of range: must be >= {low}")
        if self.image and self.venv:
            raise ConfigError("give either --image or --venv, not both")
        if self.run_id and self.sweep:
            raise ConfigError("--run-id continues one run: it cannot be combined with --sweep")
        check_env_names("--env", self.env)
        check_credential_names("--env", self.env)
        check_env_names("--pass-env", self.pass_env)
        if self.tracking_uri:
            check_tracking_uri(self.tracking_uri)
        return self

    def combinations(self) -> list[dict[str, str]]:
        """One parameter set per job (array task): params + one value of each swept name, over
        the :data:`GPU_SWITCHES` a GPU job gets (see :meth:`gpu_switches`)."""
        if not self.sweep:
            combos = [dict(self.params)]
        else:
            names = sorted(self.sweep)
            combos = [{**self.params, **dict(zip(names, values))}
                      for values in itertools.product(*(self.sweep[n] for n in names))]
        return [{**self.gpu_switches(combo), **combo} for combo in combos]

    def gpu_switches(self, combo: Mapping[str, str]) -> dict[str, str]:
        """The :data:`GPU_SWITCHES` that parameter set ``combo`` does not set itself: for a
        GPU job of an entry point that has them, unless ``device=cpu``."""
        if (not self.gpus or combo.get("device") == "cpu"
                or not set(GPU_SWITCHES) <= _config_fields(self.entry_point)):
            return {}
        return {name: value for name, value in GPU_SWITCHES.items() if name not in combo}

    def passed_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The ``pass_env`` variables with their values in ``environ`` (one line if unset)."""
        missing = [name for name in self.pass_env if name not in environ]
        if missing:
            raise ConfigError(f"--pass-env {missing[0]}: not set in your environment")
        return {name: environ[name] for name in self.pass_env}

    @property
    def world_size(self) -> int:
        return self.nodes * max(self.gpus, 1)

    def job_env(self, also_given: Sequence[str] = ()) -> dict[str, str]:
        """The literal variables of the job: ``env`` over :data:`JOB_ENV_DEFAULTS`, whose
        names the user gave no other way (``pass_env``, or a launcher's ``also_given``)."""
        given = {*self.env, *self.pass_env, *also_given}
        return {**{k: v for k, v in JOB_ENV_DEFAULTS.items() if k not in given}, **self.env}


#: What every launched job has unless the user sets it: MLflow's system metrics (CPU, memory,
#: GPU as system/* metrics of the run), worth their 10-s sampling on a cluster node; a job
#: turns them off with --env MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false.
JOB_ENV_DEFAULTS = {"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"}


def mlflow_command(entry_point: str, params: Mapping[str, str], project_dir: str = ".",
                   experiment: str = "", run_id: str = "") -> list[str]:
    """The ``mlflow run`` argv for one job (not shell-quoted: the renderers quote it)."""
    argv = ["mlflow", "run", project_dir, "-e", entry_point, "--env-manager", "local"]
    if experiment:
        argv += ["--experiment-name", experiment]
    if run_id:
        argv += ["--run-id", run_id]
    for name in sorted(params):
        argv += ["-P", f"{name}={params[name]}"]
    return argv
