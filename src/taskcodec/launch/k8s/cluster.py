"""Kubernetes, the cluster side: the kubeconfig, creating Jobs, and watching them (state, pods,
logs, deletion). The only module of the Kubernetes launcher that talks to the API server; the
``kubernetes`` client is imported inside its functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from taskcodec.errors import ConfigError, TaskcodecError
from taskcodec.launch.k8s.render import ANN_RUN_IDS, ANN_TRACKING_URI, LABEL_LAUNCH, MANAGED_BY


class KubernetesError(TaskcodecError):
    """The cluster refused a request or cannot be reached (names the object and the reason)."""


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
