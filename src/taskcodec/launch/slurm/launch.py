"""Slurm, the launch: validate -> relaunch settings -> render -> create the MLflow runs ->
submit -> tag the runs with the job. The same steps, in the same order, as
:mod:`taskcodec.launch.k8s.launch`; ``slurm-launch`` is a thin command over :func:`launch`.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from taskcodec.errors import ConfigError, TaskcodecError
from taskcodec.launch import runs
from taskcodec.launch.checks import is_credential_name
from taskcodec.launch.runs import Launched
from taskcodec.launch.slurm.cluster import Cluster, make_comment
from taskcodec.launch.slurm.render import CREDENTIAL_VARS, SlurmOptions, render_sbatch
from taskcodec.launch.spec import PROJECT_DIR, JobSpec, known_params

REMOTE_CREDENTIALS = ".config/taskcodec/credentials.env"  # relative to the login node's home


def prepare(spec: JobSpec, options: SlurmOptions, cluster: Cluster,
            credentials_file: str = "") -> str:
    """Validate everything and render the script (nothing is created or submitted)."""
    remote = bool(cluster.host)
    if not remote:  # paths in the script are taken on this machine
        options.output_dir = os.path.abspath(os.path.expanduser(options.output_dir))
        if spec.venv:
            spec.venv = os.path.abspath(os.path.expanduser(spec.venv))
    if not options.checkpoint_dir and "checkpoint_dir" in known_params(spec.entry_point):
        options.checkpoint_dir = f"{options.output_dir.rstrip('/')}/checkpoints"
    spec.validate()
    options.validate(spec)
    spec.passed_env(os.environ)
    if not spec.project_dir and not spec.image:
        if remote:
            raise ConfigError("--project-dir is needed with --host: where the taskcodec checkout "
                              "(MLProject) is on the cluster")
        spec.project_dir = str(PROJECT_DIR)
    if credentials_file and not remote:
        _check_private(credentials_file)
    if spec.run_id:
        spec.params, spec.experiment = runs.relaunch_settings(spec)
    return render_sbatch(spec, options)


def _check_private(path: str) -> None:
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except OSError as err:
        raise ConfigError(f"--credentials-file {path}: {err.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--credentials-file {path} is readable by others (mode "
                          f"{stat.S_IMODE(mode):o}); run chmod 600 {shlex.quote(path)}")


def launch(spec: JobSpec, options: SlurmOptions, cluster: Cluster, *,
           credentials_file: str = "", dry_run: bool = False) -> Launched:
    """Validate, render and (unless ``dry_run``) create the runs and submit the job. A refused
    submission marks the runs it created FAILED (see :func:`runs.discard_runs`)."""
    script = prepare(spec, options, cluster, credentials_file)
    if dry_run:
        return Launched(script)
    tags = {}
    if spec.image:
        tags["image"] = spec.image
    elif not cluster.host:
        commit = runs.git_commit(Path(spec.project_dir))
        if commit:
            tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
    count = len(spec.combinations())
    made = runs.create_runs(spec, launcher="slurm", base_name=spec.name, tags=tags,
                            task_tags=[{"slurm_array_task_id": str(i)} for i in range(count)])
    launched = Launched(script, runs=made)
    try:
        cluster.mkdir(options.output_dir)
        env = {"TASKCODEC_RUN_IDS": " ".join(made.run_ids), **_job_environment(
            spec, cluster, credentials_file, launched.notes)}
        job_id = cluster.submit(script, env=env, comment=make_comment(made.run_ids, made.links))
    except TaskcodecError as err:
        runs.discard_runs(spec, made, str(err))
        raise
    launched.job_ids.append(job_id)
    task_tags = [{"slurm_array_job_id": job_id,
                  "slurm_job": f"{job_id}_{0 if spec.run_id else index}",
                  **({"slurm_host": cluster.host} if cluster.host else {})}
                 for index in range(len(made.run_ids))]
    runs.tag_submitted(spec, made, task_tags, script, "slurm/job.sh")
    return launched


def _job_environment(spec: JobSpec, cluster: Cluster, credentials_file: str,
                     notes: list[str]) -> dict[str, str]:
    """What ``sbatch`` gets besides the run ids. Locally the job inherits this environment
    (``--export=ALL``); over SSH the ``--pass-env`` values go along on the command line, and
    the credentials (tracking ones and credential-looking ``--pass-env`` names) into a
    mode-0600 file on the login node instead, named by ``$TASKCODEC_CREDENTIALS_FILE``."""
    passed = spec.passed_env(os.environ)
    if not cluster.host:
        env = dict(passed)
    else:
        env = {k: v for k, v in passed.items() if not is_credential_name(k)}
        if not credentials_file:
            secrets = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
            secrets.update({k: v for k, v in passed.items() if is_credential_name(k)})
            if secrets:
                text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(secrets.items()))
                credentials_file = cluster.write_private(REMOTE_CREDENTIALS, text)
                notes.append(f"credentials ({', '.join(sorted(secrets))}) copied to "
                             f"{cluster.host}:{credentials_file} (mode 0600)")
    if credentials_file:
        env["TASKCODEC_CREDENTIALS_FILE"] = credentials_file
    return env
