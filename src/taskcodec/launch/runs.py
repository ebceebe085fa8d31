"""The MLflow runs made at launch, the same for both launchers: created before submitting (so each
job knows its run id and each run its job), with the job's parameters and tags and status
SCHEDULED; tagged with the cluster's ids after the submission; marked FAILED with the reason
when the submission is refused; relaunched (``--run-id``) with the parameters it was started
with. mlflow is imported only inside these functions: ``--help`` and ``--dry-run`` never load it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from taskcodec.errors import ConfigError, TaskcodecError, TrackingError
from taskcodec.launch.spec import JobSpec, known_params

#: Settings of a run that belong to one attempt, not to the experiment: not reused on relaunch.
_NOT_REUSED = {"resume", "run_name", "checkpoint_dir"}


@dataclass
class LaunchedRuns:
    run_ids: list[str]        # one per parameter combination, in order
    links: list[str]          # their MLflow UI pages ("" without an HTTP server)
    experiment_id: str
    experiment: str           # its name (``mlflow run --run-id`` must name the run's own)


@dataclass
class Launched:
    """What a launch did (both launchers): what was submitted, or on a dry run would be (the
    sbatch script, the Job manifests), the cluster's job ids, the runs, lines for the user."""

    text: str
    job_ids: list[str] = field(default_factory=list)
    runs: LaunchedRuns | None = None
    notes: list[str] = field(default_factory=list)


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run, for an HTTP tracking server ("" otherwise)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _tracking_error(spec: JobSpec, err: Exception) -> TrackingError:
    return TrackingError(f"cannot create the MLflow runs at {spec.tracking_uri}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}")


def create_runs(spec: JobSpec, *, launcher: str, base_name: str, tags: Mapping[str, str],
                task_tags: Sequence[Mapping[str, str]] = ()) -> LaunchedRuns:
    """One SCHEDULED run per parameter combination, named ``BASE-INDEX SWEPT`` (``BASE`` alone
    for a single run), with its parameters, ``tags`` and its own ``task_tags[index]``; or, with
    ``spec.run_id``, that existing run tagged ``relaunched`` and set back to SCHEDULED."""
    from taskcodec.tracking import check_reachable, experiment_name

    check_reachable(spec.tracking_uri)
    client = _client(spec.tracking_uri)
    combos = spec.combinations()
    common = {**tags, "launcher": launcher, "entry_point": spec.entry_point,
              "mlflow.project.entryPoint": spec.entry_point, "mlflow.source.type": "PROJECT"}
    try:
        if spec.run_id:
            run = client.get_run(spec.run_id)
            experiment_id = run.info.experiment_id
            name = client.get_experiment(experiment_id).name
            for key, value in {**common, **(task_tags[0] if task_tags else {}),
                               "relaunched": "true"}.items():
                client.set_tag(spec.run_id, key, value)
            run_ids = [spec.run_id]
        else:
            name = spec.experiment or experiment_name()
            experiment = client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(name))
            run_ids = [_create_run(client, spec, experiment_id, base_name, index, combo,
                                   {**common, **(task_tags[index] if task_tags else {})})
                       for index, combo in enumerate(combos)]
        for run_id in run_ids:
            client.update_run(run_id, status="SCHEDULED")
    except TaskcodecError:
        raise
    except Exception as err:
        raise _tracking_error(spec, err) from None
    links = [ui_link(spec.tracking_uri, experiment_id, run_id) for run_id in run_ids]
    return LaunchedRuns(run_ids, links, experiment_id, name)


def _create_run(client, spec: JobSpec, experiment_id: str, base_name: str, index: int,
                combo: Mapping[str, str], tags: Mapping[str, str]) -> str:
    from mlflow.entities import Param

    swept = ",".join(f"{k}={combo[k]}" for k in sorted(spec.sweep))
    single = len(spec.combinations()) == 1
    run_name = base_name if single else f"{base_name}-{index}" + (f" {swept}" if swept else "")
    run = client.create_run(experiment_id, run_name=run_name, tags={
        **tags, "launch_index": str(index), **({"sweep": swept} if swept else {})})
    client.log_batch(run.info.run_id,
                     params=[Param(k, str(v)) for k, v in sorted(combo.items())])
    return run.info.run_id


def tag_submitted(spec: JobSpec, runs: LaunchedRuns, task_tags: Sequence[Mapping[str, str]],
                  text: str, artifact: str) -> None:
    """After the submission: each run gets the cluster's ids of its job (``task_tags[index]``)
    and keeps what was submitted (the script or manifest) as the artifact ``artifact``."""
    client = _client(spec.tracking_uri)
    for run_id, tags in zip(runs.run_ids, task_tags, strict=True):
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.log_text(run_id, text, artifact)


def discard_runs(spec: JobSpec, runs: LaunchedRuns, reason: str) -> None:
    """Runs of a launch whose submission failed: tagged ``launch_error`` with the reason and
    marked FAILED, so that no run waits forever for a job that never comes."""
    client = _client(spec.tracking_uri)
    for run_id in runs.run_ids:
        try:
            client.set_tag(run_id, "launch_error", reason[:500])
            client.set_terminated(run_id, "FAILED")
        except Exception:  # best effort: the submission error is what the user must see
            pass


def end_runs(tracking_uri: str, run_ids: Sequence[str], status: str, note: str = "") -> list[str]:
    """Mark runs that are still RUNNING or SCHEDULED as ``status`` (a cancelled job); returns
    the ids it could not update."""
    client = _client(tracking_uri)
    failed = []
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
                if note:
                    client.set_tag(run_id, "cancel_note", note)
                client.set_terminated(run_id, status)
        except Exception:
            failed.append(run_id)
    return failed


def relaunch_settings(spec: JobSpec) -> tuple[dict[str, str], str]:
    """For ``--run-id``: the parameters the run was started with (the user's -P win) and the
    name of its experiment (``mlflow run --run-id`` must name the run's own experiment)."""
    client = _client(spec.tracking_uri)
    try:
        run = client.get_run(spec.run_id)
    except Exception as err:
        raise ConfigError(f"--run-id {spec.run_id}: no such run at {spec.tracking_uri} "
                          f"({str(err).splitlines()[0][:120]})") from None
    known = known_params(spec.entry_point)
    kept = {k: v for k, v in run.data.params.items()
            if k in known and k not in _NOT_REUSED and v != ""}
    experiment = client.get_experiment(run.info.experiment_id).name
    return {**kept, **spec.params}, experiment


def git_commit(path: Path) -> str:
    from taskcodec.tracking import git_commit as commit_of

    return commit_of(path) or ""
