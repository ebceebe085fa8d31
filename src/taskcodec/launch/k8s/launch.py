"""Kubernetes, the launch: validate -> relaunch settings -> create the MLflow runs -> render ->
submit -> tag the runs with their Jobs. The steps of :mod:`taskcodec.launch.slurm.launch`, but
the manifest is rendered after the runs are created, as it names their ids (a Slurm job reads
them from its environment); ``k8s-launch`` is a thin command over :func:`launch`.
"""

from __future__ import annotations

import os
from dataclasses import replace

from taskcodec.errors import ConfigError
from taskcodec.launch import runs
from taskcodec.launch.checks import unreached_credentials
from taskcodec.launch.k8s.cluster import Cluster, KubernetesError, submit
from taskcodec.launch.k8s.render import (
    DEFAULT_IMAGE,
    IMAGE_PROJECT_DIR,
    K8sOptions,
    render_jobs,
    to_yaml,
    unmounted_paths,
    validate,
)
from taskcodec.launch.runs import Launched
from taskcodec.launch.spec import JobSpec


def prepare(spec: JobSpec, opts: K8sOptions, environ=os.environ) -> tuple[JobSpec, list[str]]:
    """Validate everything; the spec with the ``--pass-env`` values in its environment, and
    warnings for the user (nothing is created or submitted)."""
    validate(spec, opts)
    spec = replace(spec, env={**spec.passed_env(environ), **spec.env}, pass_env=[])
    notes = unmounted_paths(spec, opts)
    missing = unreached_credentials(environ, [*opts.secret_env, *spec.env])
    if missing and spec.tracking_uri.startswith(("http://", "https://")):
        # A warning, not a refusal: the server may take anonymous writes, or the credentials
        # may be for another server; the launcher cannot tell before the pods run.
        notes.append(f"warning: {', '.join(missing)} set here but not given to the pods: if "
                     "the tracking server needs them, the pods fail at their first log call; "
                     f"add --secret-env {missing[-1]}=SECRET:KEY")
    return spec, notes


def launch(spec: JobSpec, opts: K8sOptions, cluster: Cluster | None, *, context: str = "",
           dry_run: bool = False) -> Launched:
    """Validate, render and (unless ``dry_run``) create the runs and the Jobs. A refused
    submission marks the runs it created FAILED (see :func:`runs.discard_runs`)."""
    spec, notes = prepare(spec, opts)
    if dry_run:
        run_ids = [spec.run_id] if spec.run_id else [
            f"dry-run-{i}" for i in range(len(spec.combinations()))]
        return Launched(to_yaml(render_jobs(spec, opts, run_ids)), notes=notes)
    if not spec.tracking_uri:
        raise ConfigError("no tracking URI: give --tracking-uri or set MLFLOW_TRACKING_URI to an "
                          "MLflow server that the pods can reach")
    assert cluster is not None, "a real launch needs a cluster"
    opts = replace(opts, namespace=opts.namespace or cluster.namespace)
    if spec.run_id:
        params, experiment = runs.relaunch_settings(spec)
        spec = replace(spec, params=params, experiment=experiment)
    combos = spec.combinations()
    indexed = len(combos) > 1 and opts.sweep_mode == "indexed"
    made = runs.create_runs(
        spec, launcher="k8s", base_name=opts.job_name,
        tags={"image": spec.image or DEFAULT_IMAGE, "mlflow.project.backend": "kubernetes",
              "mlflow.source.name": spec.project_dir or IMAGE_PROJECT_DIR},
        task_tags=[{"k8s_completion_index": str(i)} if indexed else {} for i in range(len(combos))])
    manifests = render_jobs(replace(spec, experiment=made.experiment), opts, made.run_ids)
    text = to_yaml(manifests)
    try:
        names = submit(manifests, cluster, opts.namespace)
    except KubernetesError as err:
        runs.discard_runs(spec, made, f"job not created: {err}")
        raise
    where = {"k8s_namespace": opts.namespace, **({"k8s_context": context} if context else {})}
    jobs = names if len(names) == len(made.run_ids) else names * len(made.run_ids)
    runs.tag_submitted(spec, made, [{"k8s_job": job, **where} for job in jobs], text,
                       "k8s/job.yaml")
    return Launched(text, job_ids=names, runs=made, notes=notes)
