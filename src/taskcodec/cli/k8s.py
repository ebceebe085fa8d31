"""``k8s-launch``, ``k8s-status``, ``k8s-log``, ``k8s-cancel``: run MLflow entry points as
Kubernetes Jobs in the training image, and manage them without kubectl.

Thin Click commands over :mod:`taskcodec.launch.k8s`. ``--help`` is instant: the kubernetes
client and mlflow are imported only when a command talks to a cluster or a tracking server.
Any taskcodec error ends as one ``Error:`` line with exit status 2. Also runs as
``python -m taskcodec.cli.k8s launch|status|log|cancel ...``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import click

from taskcodec.cli.errors import Command
from taskcodec.cli.options import job_options
from taskcodec.launch import k8s
from taskcodec.launch.spec import JobSpec, parse_assignments, parse_sweep

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_DEFAULT_EXPERIMENT = "taskcodec"  # taskcodec.tracking.DEFAULT_EXPERIMENT


def _say(message: str) -> None:
    click.echo(message, err=True)


def _cluster_options(func):
    """--namespace, --context, --kubeconfig, shared by all four commands."""
    func = click.option("--kubeconfig", envvar="KUBECONFIG", default="", metavar="FILE",
                        help="kubeconfig file [env: KUBECONFIG; default ~/.kube/config, or the "
                             "in-cluster service account]")(func)
    func = click.option("--context", envvar="TASKCODEC_K8S_CONTEXT", default="", metavar="NAME",
                        help="kubeconfig context [env: TASKCODEC_K8S_CONTEXT; default: the "
                             "current one]")(func)
    func = click.option("-n", "--namespace", envvar="TASKCODEC_K8S_NAMESPACE", default="",
                        metavar="NAME", help="namespace [env: TASKCODEC_K8S_NAMESPACE; default: "
                                             "the context's]")(func)
    return func


def _connect(context: str, kubeconfig: str) -> k8s.Cluster:
    return k8s.connect(context=context, kubeconfig=kubeconfig)


@click.command(cls=Command, context_settings=_CONTEXT)
@click.argument("entry_point", metavar="ENTRY_POINT")
@job_options("pod", "written into the manifest, so never credentials: use --secret-env")
@click.option("--sweep-mode", type=click.Choice(["indexed", "jobs"]), default="indexed",
              show_default=True, help="one Indexed Job, or one Job per combination")
@click.option("--parallelism", type=int, default=0, metavar="N",
              help="pods of an Indexed Job at once [default: all]")
@click.option("--image", envvar="TASKCODEC_IMAGE", default=k8s.DEFAULT_IMAGE,
              show_default=True, metavar="IMAGE",
              help="training image (make training-image; make push-image) [env: TASKCODEC_IMAGE]")
@click.option("--pull-policy", type=click.Choice(["IfNotPresent", "Always", "Never"]),
              default="IfNotPresent", show_default=True, help="image pull policy")
@click.option("--image-pull-secret", default="", metavar="SECRET",
              help="Secret with the registry credentials")
@click.option("--gpus", type=int, default=0, show_default=True,
              help="GPUs (nvidia.com/gpu limit); more than one runs torchrun")
@click.option("--gpu-type", default="", metavar="PRODUCT",
              help=f"node selector {k8s.GPU_PRODUCT_LABEL}=PRODUCT")
@click.option("--gpu-resource", default="nvidia.com/gpu", show_default=True, metavar="NAME",
              help="extended resource that counts GPUs")
@click.option("--cpus", type=int, default=2, show_default=True, help="CPU request")
@click.option("--cpu-limit", default="", metavar="QUANTITY", help="CPU limit [default: none]")
@click.option("--memory", default="", metavar="QUANTITY",
              help="memory request, e.g. 16Gi [default: none]")
@click.option("--memory-limit", default="", metavar="QUANTITY",
              help="memory limit [default: --memory]")
@click.option("--shm-size", default="1Gi", show_default=True, metavar="QUANTITY",
              help="/dev/shm size for data loader workers (0: none)")
@click.option("--node-selector", multiple=True, metavar="KEY=VALUE", help="repeatable")
@click.option("--toleration", multiple=True, metavar="KEY[=VALUE][:EFFECT]",
              help="tolerate a taint (repeatable)")
@click.option("--volume-claim", default="", metavar="PVC",
              help="PersistentVolumeClaim for data and checkpoints (a retried pod resumes "
                   "from it)")
@click.option("--mount-path", default=k8s.DEFAULT_MOUNT, show_default=True, metavar="PATH",
              help="where the volume is mounted")
@click.option("--secret-env", multiple=True, metavar="NAME=SECRET:KEY",
              help="environment variable from a key of a Secret (repeatable)")
@click.option("--name", "prefix", default="taskcodec", show_default=True, metavar="PREFIX",
              help="job name prefix (the job is PREFIX-ENTRY_POINT-DATE-TIME)")
@click.option("--job-name", default="", metavar="NAME", help="exact job name instead")
@click.option("--time", "--active-deadline", "time", default="", metavar="DURATION",
              help="deadline of the whole Job: 12h, 2d, 90m or Slurm's D-HH:MM:SS")
@click.option("--ttl", default="3d", show_default=True, metavar="DURATION",
              help="delete the finished Job (and its logs) after this long")
@click.option("--backoff-limit", type=int, default=3, show_default=True,
              help="failed pods before the Job fails (per index for a sweep); preempted pods "
                   "do not count")
@click.option("--grace-period", type=int, default=120, show_default=True, metavar="SECONDS",
              help="time between SIGTERM and SIGKILL, for the final checkpoint")
@click.option("--service-account", default="", metavar="NAME")
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="extra label (repeatable)")
@_cluster_options
@click.option("--dry-run", is_flag=True,
              help="print the manifest(s) as YAML and stop: nothing is sent, no run created")
def launch(entry_point, params, sweep, sweep_mode, parallelism, image, pull_policy,
           image_pull_secret, gpus, gpu_type, gpu_resource, cpus, cpu_limit, memory,
           memory_limit, shm_size, node_selector, toleration, volume_claim, mount_path, env_items,
           pass_env, secret_env, tracking_uri, experiment, run_id, prefix, job_name, time, ttl,
           backoff_limit, grace_period, service_account, label, namespace, context, kubeconfig,
           dry_run):
    """Run an MLflow entry point of taskcodec as a Kubernetes Job.

    Each run is an MLflow run created now and tagged with its Job; the Job carries the run ids
    (labels and annotations). A preempted or evicted pod is retried and resumes its run from
    the last checkpoint (on --volume-claim, else from the run's artifacts).

    \b
    Examples:
      k8s-launch train --dry-run --gpus 1 -P lmbda=0.01
      k8s-launch train --image registry.example.org/lab/taskcodec:0.1.0 --gpus 1 \\
          --memory 24Gi --volume-claim taskcodec-data -P data=/mnt/taskcodec/clic \\
          --tracking-uri http://mlflow.mlflow:5000 \\
          --secret-env MLFLOW_TRACKING_PASSWORD=mlflow-auth:password
      k8s-launch train --gpus 1 --sweep lmbda=0.0018,0.0067,0.013,0.0483 -P epochs=200
      k8s-launch train --gpus 4 --gpu-type NVIDIA-A100-SXM4-80GB --toleration dedicated=ml:NoSchedule
    """
    spec = JobSpec(entry_point=entry_point, params=parse_assignments(params),
                   sweep=parse_sweep(sweep), name=prefix,
                   experiment=experiment or _DEFAULT_EXPERIMENT, tracking_uri=tracking_uri or "",
                   run_id=run_id or "", gpus=gpus, gpu_type=gpu_type,
                   cpus=cpus, memory=memory, time=time, image=image,
                   env=parse_assignments(env_items, "--env"), pass_env=list(pass_env))
    now = datetime.now(UTC)
    opts = k8s.K8sOptions(
        job_name=job_name or k8s.default_job_name(prefix, entry_point, now),
        namespace=namespace, cpu_limit=cpu_limit, memory_limit=memory_limit,
        shm_size=shm_size, gpu_resource=gpu_resource,
        node_selector=parse_assignments(node_selector, "--node-selector") if node_selector
        else {}, tolerations=[k8s.parse_toleration(t) for t in toleration],
        volume_claim=volume_claim, mount_path=mount_path,
        secret_env=parse_assignments(secret_env, "--secret-env"), backoff_limit=backoff_limit,
        ttl=ttl, grace_period=grace_period, sweep_mode=sweep_mode, parallelism=parallelism,
        image_pull_policy=pull_policy, image_pull_secret=image_pull_secret,
        service_account=service_account, labels=parse_assignments(label, "--label"))
    if dry_run:
        launched = k8s.launch(spec, opts, None, dry_run=True)
        click.echo(launched.text, nl=False)
        for note in launched.notes:
            _say(note)
        _say("dry run: nothing was sent and no MLflow run was created; the run ids above are "
             "placeholders for the runs a real launch creates")
        if not tracking_uri:
            _say("note: no tracking URI (--tracking-uri or MLFLOW_TRACKING_URI); a real launch "
                 "needs an MLflow server the pods can reach")
        return
    k8s.prepare(spec, opts)  # before connecting: bad input never waits for a cluster
    cluster = _connect(context, kubeconfig)
    launched = k8s.launch(spec, opts, cluster, context=context)
    for note in launched.notes:
        _say(note)
    for name in launched.job_ids:
        click.echo(name)
    run_ids = launched.runs.run_ids
    what = f"{len(run_ids)} runs" if len(run_ids) > 1 else "1 run"
    _say(f"k8s-launch: created job {', '.join(launched.job_ids)} in namespace "
         f"{opts.namespace or cluster.namespace} ({what})")
    for link in launched.runs.links:
        if link:
            _say(f"k8s-launch: MLflow run {link}")
    first = launched.job_ids[0] if len(launched.job_ids) == 1 else opts.job_name
    _say(f"k8s-launch: watch with: k8s-status {first} | k8s-log {first} -f | k8s-cancel {first}")


@click.command(cls=Command, context_settings=_CONTEXT)
@click.argument("name", required=False, metavar="[JOB]")
@_cluster_options
def status(name, namespace, context, kubeconfig):
    """State of a job (or of all jobs of a launch) with its pods and MLflow runs.

    Without JOB: every job k8s-launch created in the namespace.

    \b
    Examples:
      k8s-status
      k8s-status taskcodec-train-20261126-101500
    """
    cluster = _connect(context, kubeconfig)
    if not name:
        jobs = k8s.list_jobs(cluster, namespace)
        if not jobs:
            _say(f"no k8s-launch jobs in namespace {namespace or cluster.namespace}")
        for job in jobs:
            click.echo(f"{job.name:<44} {job.state:<10} {job.succeeded}/{job.completions} done"
                       f"  {job.failed} failed  {job.active} active")
        return
    for job in k8s.job_status(cluster, name, namespace):
        click.echo(f"job {job.name} ({job.namespace}): {job.state}, {job.succeeded}/"
                   f"{job.completions} done, {job.failed} failed, {job.active} active")
        if job.message:
            click.echo(f"  {job.message}")
        for index, rid in enumerate(job.run_ids):
            where = f"index {index}: " if len(job.run_ids) > 1 else ""
            click.echo(f"  MLflow run {where}{rid}" + (f" at {job.tracking_uri}"
                                                       if job.tracking_uri else ""))
        for pod in job.pods:
            index = f" [index {pod.index}]" if pod.index else ""
            node = f" on {pod.node}" if pod.node else ""
            detail = f" {pod.detail}" if pod.detail else ""
            click.echo(f"  pod {pod.name}{index}: {pod.phase}{node}{detail}")


@click.command(cls=Command, context_settings=_CONTEXT)
@click.argument("name", metavar="JOB")
@click.option("-f", "--follow", is_flag=True, help="stream the log until the pod ends")
@click.option("--index", default=None, metavar="N", help="only the pod of this sweep index")
@click.option("--tail", type=int, default=None, metavar="LINES", help="only the last LINES")
@_cluster_options
def log(name, follow, index, tail, namespace, context, kubeconfig):
    """Print the log of a job's pod (the newest pod of each sweep index).

    \b
    Examples:
      k8s-log taskcodec-train-20261126-101500 -f
      k8s-log taskcodec-train-20261126-101500 --index 2 --tail 50
    """
    cluster = _connect(context, kubeconfig)
    pods = set()
    lines = []
    for pod, line in k8s.pod_logs(cluster, name, namespace, index=index, follow=follow,
                                  tail=tail):
        pods.add(pod)
        if follow:
            click.echo(line)
        else:
            lines.append((pod, line))
    prefix = len(pods) > 1
    for pod, line in lines:
        click.echo(f"[{pod}] {line}" if prefix else line)


@click.command(cls=Command, context_settings=_CONTEXT)
@click.argument("name", metavar="JOB")
@_cluster_options
def cancel(name, namespace, context, kubeconfig):
    """Delete a job (or all jobs of a launch) and its pods; mark its MLflow runs KILLED.

    Running pods get SIGTERM and write a checkpoint first, so `k8s-launch --run-id RUN_ID`
    can continue a run later.

    \b
    Example:
      k8s-cancel taskcodec-train-20261126-101500
    """
    from taskcodec.launch.runs import end_runs

    cluster = _connect(context, kubeconfig)
    jobs = k8s.cancel(cluster, name, namespace)
    for job in jobs:
        click.echo(job.name)
        _say(f"k8s-cancel: deleted job {job.name} in namespace {job.namespace}")
        if job.tracking_uri and job.run_ids:
            failed = end_runs(job.tracking_uri, job.run_ids, "KILLED", "cancelled with k8s-cancel")
            done = len(job.run_ids) - len(failed)
            _say(f"k8s-cancel: marked {done} MLflow run(s) KILLED" + (
                f"; could not update {', '.join(failed)} at {job.tracking_uri}" if failed else ""))


@click.group(context_settings=_CONTEXT)
def cli():
    """Kubernetes jobs of taskcodec (the k8s-* commands as subcommands)."""


for _command in (launch, status, log, cancel):
    cli.add_command(_command)


if __name__ == "__main__":
    cli(prog_name="python -m taskcodec.cli.k8s")
