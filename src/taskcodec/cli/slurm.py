"""``slurm-launch``, ``slurm-status``, ``slurm-log``, ``slurm-cancel``: thin Click commands over
:mod:`taskcodec.launch.slurm`.

Defaults come from TOML files, later ones winning: ``$XDG_CONFIG_HOME/taskcodec/slurm.toml``
(default ``~/.config/taskcodec/slurm.toml``, per user), ``./.taskcodec/slurm.toml`` (per project)
and ``--config FILE`` / ``$TASKCODEC_SLURM_CONFIG``; options on the command line win over all.
Keys are the long option names with ``_`` (``account = "def-me"``, ``gpus = "a100:1"``,
``setup = ["module load apptainer"]``, ``env = {OMP_NUM_THREADS = "4"}``,
``ssh_options = ["-o", "ControlPersist=10m"]``); an unknown key is an error.

mlflow is imported only when a run is created, torch never: ``--help`` answers at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from taskcodec.cli.errors import one_line_errors
from taskcodec.cli.options import job_options
from taskcodec.errors import ConfigError, TaskcodecError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_LIST_KEYS = {"binds", "pass_env", "setup", "ssh_options"}
_KEYS = {"name", "account", "partition", "qos", "constraint", "time", "nodes", "gpus", "cpus",
         "memory", "max_parallel", "experiment", "tracking_uri", "image", "venv", "runtime",
         "project_dir", "env", "output_dir", "checkpoint_dir", "stage_data", "signal_grace",
         "mail_type", "mail_user", "credentials_file", "host", "depends_on", *_LIST_KEYS}


def config_files(explicit: str = "") -> list[Path]:
    """The defaults files that apply, lowest precedence first (see the module docstring)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    files = [base / "taskcodec" / "slurm.toml", Path.cwd() / ".taskcodec" / "slurm.toml"]
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        files.append(path)
    return [f for f in files if f.is_file()]


def load_defaults(explicit: str = "") -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in config_files(explicit):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from None
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
        for key in _LIST_KEYS | {"env"}:
            expected = dict if key == "env" else list
            if key in data and not isinstance(data[key], expected):
                raise ConfigError(f"{path}: {key} must be a {'table' if key == 'env' else 'list'}")
        env = {**merged.get("env", {}), **data.get("env", {})}
        merged.update(data)
        if env:
            merged["env"] = {str(k): str(v) for k, v in env.items()}
    return merged


def _pick(cli_value: Any, defaults: dict[str, Any], key: str, fallback: Any) -> Any:
    if cli_value is not None:
        return cli_value
    return defaults.get(key, fallback)


def _cluster(host: str | None, ssh_config: str | None, defaults: dict[str, Any]):
    from taskcodec.launch.slurm import Cluster

    options = [str(o) for o in defaults.get("ssh_options", [])]
    if ssh_config:
        options += ["-F", ssh_config]
    return Cluster(_pick(host, defaults, "host", ""), options)


_HOST = click.option("--host", metavar="LOGIN", default=None,
                     help="run Slurm commands on this login node over SSH (your ssh config and "
                          "keys) [config: host]")
_SSH_CONFIG = click.option("--ssh-config", metavar="FILE", default=None,
                           help="ssh configuration file to use (ssh -F)")
_CONFIG = click.option("--config", "config_file", metavar="FILE", default="",
                       envvar="TASKCODEC_SLURM_CONFIG",
                       help="defaults file read after the user and project ones "
                            "[env: TASKCODEC_SLURM_CONFIG]")


@click.command(context_settings=CONTEXT)
@click.argument("entry_point")
@job_options("array task", "not written into the script, so also for credentials")
@click.option("--name", "-J", default=None, help="job name [default: taskcodec-ENTRY_POINT]")
@click.option("--account", "-A", default=None, help="Slurm account (e.g. def-someprof)")
@click.option("--partition", "-p", default=None)
@click.option("--qos", default=None)
@click.option("--constraint", default=None, help="node features (sbatch --constraint)")
@click.option("--time", "-t", "time_limit", default=None, metavar="TIME",
              help="time limit: minutes, H:MM:SS or D-HH:MM:SS")
@click.option("--nodes", "-N", type=int, default=None, help="nodes [default: 1]")
@click.option("--gpus", "-G", default=None, metavar="[TYPE:]N",
              help="GPUs per node, e.g. 2 or a100:2 (more than one: torchrun) [default: 0]")
@click.option("--cpus", "-c", type=int, default=None, help="CPUs per node [default: 2]")
@click.option("--memory", "--mem", default=None, metavar="SIZE", help="memory per node, e.g. 16G")
@click.option("--depends-on", default=None, metavar="JOBS",
              help="start after these jobs succeed (123,456) or a Slurm dependency expression")
@click.option("--max-parallel", type=int, default=None, metavar="N",
              help="run at most N array tasks at a time")
@click.option("--image", default=None,
              help="run in this container: an Apptainer/Singularity .sif, or an image for "
                   "podman/docker")
@click.option("--runtime", type=click.Choice(["auto", "apptainer", "podman", "docker"]),
              default=None, help="container runtime for --image [default: auto]")
@click.option("--bind", "binds", multiple=True, metavar="SRC[:DST]",
              help="also mount this path in the container (data, scratch)")
@click.option("--venv", default=None, metavar="PATH",
              help="activate this Python environment on the compute node")
@click.option("--project-dir", default=None, metavar="PATH",
              help="where MLProject is on the compute side [default: this checkout; "
                   "/opt/taskcodec in an image]")
@click.option("--setup", multiple=True, metavar="LINE",
              help="shell line run before training, e.g. 'module load apptainer'")
@click.option("--output-dir", default=None, metavar="DIR",
              help="where the logs %x-%A_%a.out go [default: ./slurm-logs]")
@click.option("--checkpoint-dir", default=None, metavar="DIR",
              help="checkpoints in DIR/RUN_ID [default: OUTPUT_DIR/checkpoints]")
@click.option("--stage-data/--no-stage-data", default=None,
              help="copy -P data=PATH to node-local scratch ($SLURM_TMPDIR) first")
@click.option("--signal-grace", type=int, default=None, metavar="SECONDS",
              help="checkpoint and requeue this long before the time limit [default: 300]")
@click.option("--mail-type", default=None, metavar="TYPES", help="e.g. END,FAIL")
@click.option("--mail-user", default=None, metavar="EMAIL")
@click.option("--credentials-file", default=None, metavar="PATH",
              help="0600 file of KEY=VALUE lines (e.g. MLFLOW_TRACKING_TOKEN) the job reads")
@_HOST
@_SSH_CONFIG
@_CONFIG
@click.option("--dry-run", is_flag=True,
              help="print the sbatch script and stop: no MLflow run, nothing submitted")
@one_line_errors
def launch(entry_point: str, params, sweep, name, account, partition, qos, constraint, time_limit,
           nodes, gpus, cpus, memory, depends_on, max_parallel, experiment, tracking_uri, run_id,
           image, runtime, binds, venv, project_dir, env_items, pass_env, setup, output_dir,
           checkpoint_dir, stage_data, signal_grace, mail_type, mail_user, credentials_file,
           host, ssh_config, config_file, dry_run) -> None:
    """Run an MLflow entry point of this project as a Slurm job array, one task (and one MLflow
    run) per parameter combination.

    The runs are created now, so their ids and links are printed at once; each task continues
    its run (also after a requeue or preemption, from its last checkpoint). Prints one line per
    task: JOB_TASK RUN_ID LINK.

    \b
    Examples:
      slurm-launch train -P lmbda=0.0130 --gpus 1 --time 12:00:00 --venv ~/taskcodec/.venv
      slurm-launch train --sweep lmbda=0.0018,0.0067,0.0250 -P codec=mbt2018-mean \\
          --account def-me --gpus a100:1 --image ~/images/taskcodec.sif --stage-data \\
          -P data=~/data/clic.tar
      slurm-launch train --gpus 4 --image ~/taskcodec.sif     # torchrun, 4 processes
      slurm-launch train --host cluster-login -P lmbda=0.0483 --project-dir ~/taskcodec
      slurm-launch train --run-id 3f2a...                     # relaunch, resume that run
      slurm-launch train --sweep lmbda=0.01,0.02 --dry-run    # only print the script

    Defaults: ~/.config/taskcodec/slurm.toml, ./.taskcodec/slurm.toml, --config FILE.
    """
    from taskcodec.launch import slurm
    from taskcodec.launch.spec import JobSpec, parse_assignments, parse_sweep

    defaults = load_defaults(config_file)
    cluster = _cluster(host, ssh_config, defaults)
    gpu_type, gpu_count = slurm.parse_gpus(_pick(gpus, defaults, "gpus", "0"))
    env = {**defaults.get("env", {}), **parse_assignments(env_items, "--env")}
    uri = _pick(tracking_uri, defaults, "tracking_uri", "")
    if not uri:
        raise ConfigError("no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI "
                          "(the jobs log there, so the compute nodes must reach it)")
    spec = JobSpec(
        entry_point=entry_point, params=parse_assignments(params), sweep=parse_sweep(sweep),
        name=_pick(name, defaults, "name", f"taskcodec-{entry_point}"),
        experiment=_pick(experiment, defaults, "experiment", "taskcodec"),
        tracking_uri=uri, run_id=run_id or "",
        nodes=int(_pick(nodes, defaults, "nodes", 1)), gpus=gpu_count, gpu_type=gpu_type,
        cpus=int(_pick(cpus, defaults, "cpus", 2)), memory=str(_pick(memory, defaults, "memory", "")),
        time=str(_pick(time_limit, defaults, "time", "")),
        image=_pick(image, defaults, "image", ""), venv=_pick(venv, defaults, "venv", ""),
        env=env, pass_env=[*defaults.get("pass_env", []), *pass_env],
        project_dir=_pick(project_dir, defaults, "project_dir", ""),
    )
    options = slurm.SlurmOptions(
        account=_pick(account, defaults, "account", ""),
        partition=_pick(partition, defaults, "partition", ""),
        qos=_pick(qos, defaults, "qos", ""), constraint=_pick(constraint, defaults, "constraint", ""),
        output_dir=str(_pick(output_dir, defaults, "output_dir", "slurm-logs")),
        checkpoint_dir=_pick(checkpoint_dir, defaults, "checkpoint_dir", ""),
        depends_on=str(_pick(depends_on, defaults, "depends_on", "")),
        mail_type=_pick(mail_type, defaults, "mail_type", ""),
        mail_user=_pick(mail_user, defaults, "mail_user", ""),
        signal_grace=int(_pick(signal_grace, defaults, "signal_grace", slurm.DEFAULT_SIGNAL_GRACE)),
        max_parallel=int(_pick(max_parallel, defaults, "max_parallel", 0)),
        runtime=_pick(runtime, defaults, "runtime", "auto"),
        binds=[*defaults.get("binds", []), *binds], setup=[*defaults.get("setup", []), *setup],
        stage_data=bool(_pick(stage_data, defaults, "stage_data", False)),
    )
    launched = slurm.launch(spec, options, cluster, dry_run=dry_run,
                            credentials_file=_pick(credentials_file, defaults,
                                                   "credentials_file", ""))
    for note in launched.notes:
        click.echo(note, err=True)
    if dry_run:
        click.echo(launched.text, nl=False)
        click.echo(f"dry run: {len(spec.combinations())} array task(s); nothing submitted, "
                   "no MLflow run created", err=True)
        return
    (job_id,) = launched.job_ids
    where = f" on {cluster.host}" if cluster.host else ""
    click.echo(f"submitted job {job_id}{where}: {len(launched.runs.run_ids)} array task(s), "
               f"logs in {options.output_dir}", err=True)
    for index, (run, link) in enumerate(zip(launched.runs.run_ids, launched.runs.links)):
        click.echo(f"{job_id}_{index} {run} {link}".rstrip())


@click.command(context_settings=CONTEXT)
@click.option("--all", "all_jobs", is_flag=True, help="also jobs not launched by slurm-launch")
@click.option("--all-users", is_flag=True, help="jobs of every user, not only yours")
@click.option("--run-ids", is_flag=True, help="show run ids instead of UI links")
@_HOST
@_SSH_CONFIG
@_CONFIG
@one_line_errors
def status(all_jobs: bool, all_users: bool, run_ids: bool, host, ssh_config, config_file) -> None:
    """Show your taskcodec jobs: state, elapsed time, node (or why it waits), MLflow run.

    \b
    Examples:
      slurm-status
      slurm-status --host cluster-login --run-ids
    """
    from taskcodec.launch.slurm import format_jobs

    cluster = _cluster(host, ssh_config, load_defaults(config_file))
    rows = cluster.jobs(all_users=all_users, all_jobs=all_jobs)
    if not rows:
        click.echo("no taskcodec jobs in the queue (finished ones are not listed)", err=True)
        return
    click.echo(format_jobs(rows, links=not run_ids))


@click.command(context_settings=CONTEXT)
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="keep printing as the log grows (Ctrl-C stops)")
@click.option("--output-dir", default=None, metavar="DIR",
              help="where to look for logs of jobs Slurm has forgotten [config: output_dir]")
@_HOST
@_SSH_CONFIG
@_CONFIG
@one_line_errors
def log(job: str, follow: bool, output_dir, host, ssh_config, config_file) -> None:
    """Print the output of JOB: all its array tasks (123), or one task (123_4).

    \b
    Examples:
      slurm-log 123456
      slurm-log 123456_2 -f
      slurm-log 123456 --host cluster-login
    """
    defaults = load_defaults(config_file)
    cluster = _cluster(host, ssh_config, defaults)
    directory = str(_pick(output_dir, defaults, "output_dir", "slurm-logs"))
    if not cluster.host:
        directory = os.path.abspath(os.path.expanduser(directory))
    files = cluster.log_files(job, directory)
    if not files:
        raise ConfigError(f"no output found for job {job} (not known to Slurm any more, and no "
                          f"*-{job.split('_')[0]}_*.out in {directory}; see --output-dir)")
    if follow and cluster.unfinished(job):  # a finished task's log does not grow: print it
        try:
            sys.exit(subprocess.call(cluster.follow_argv(files)))
        except KeyboardInterrupt:
            sys.exit(0)
    for path in files:
        if len(files) > 1:
            click.echo(f"==> {path} <==")
        try:
            click.echo(cluster.read(path), nl=False)
        except TaskcodecError as err:  # a pending task has no log yet
            click.echo(f"({err})", err=True)


@click.command(context_settings=CONTEXT)
@click.argument("jobs", nargs=-1)
@click.option("--all", "all_jobs", is_flag=True, help="cancel all your taskcodec jobs")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_HOST
@_SSH_CONFIG
@_CONFIG
@one_line_errors
def cancel(jobs: tuple[str, ...], all_jobs: bool, yes: bool, host, ssh_config, config_file) -> None:
    """Cancel JOBS (123 for a whole array, 123_4 for one task), or --all your taskcodec jobs.

    Running tasks get SIGTERM: training writes a checkpoint, so the run can be relaunched with
    ``slurm-launch ENTRY_POINT --run-id RUN``.

    \b
    Examples:
      slurm-cancel 123456
      slurm-cancel 123456_3 --yes
      slurm-cancel --all --host cluster-login
    """
    if bool(jobs) == all_jobs:
        raise click.UsageError("give job ids or --all (not both)")
    cluster = _cluster(host, ssh_config, load_defaults(config_file))
    targets = list(jobs)
    if all_jobs:
        targets = sorted({row.job_id.split("_")[0] for row in cluster.jobs()}, key=int)
        if not targets:
            click.echo("no taskcodec jobs to cancel", err=True)
            return
    if not yes:
        click.confirm(f"Cancel job{'s' if len(targets) > 1 else ''} {' '.join(targets)}"
                      f"{' on ' + cluster.host if cluster.host else ''}?", abort=True, err=True)
    finished = cluster.cancel(targets)
    cancelled = [job for job in targets if job not in finished]
    if cancelled:
        click.echo(f"cancelled {' '.join(cancelled)}", err=True)
    if finished:
        click.echo(f"{' '.join(finished)} had already finished: nothing to cancel", err=True)
