"""The MLflow run lifecycle: where runs go, opening/reopening a run, and logging that never
stalls or loses training.

* Tracking URI: ``$MLFLOW_TRACKING_URI``, else an embedded sqlite store ``./mlflow.db`` (the
  same default ``mlflow run`` and ``mlflow ui`` use), so everything works on a laptop.
* Experiment: ``$MLFLOW_EXPERIMENT_NAME``, else ``taskcodec``.
* :class:`RunLogger` sends metrics and artifacts from a background thread. A tracking server
  that goes away mid-training does not stop training: calls are retried with backoff, metrics
  wait in memory, checkpoints stay on local disk until their upload succeeded. Whatever could
  not be sent by the end is written next to the checkpoints and named in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskcodec.errors import TrackingError
from taskcodec.mlflow_plugin import DEFAULT_EXPERIMENT

log = logging.getLogger(__name__)

# MLflow's own HTTP retries block for minutes; our logger retries in the background instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# end_run() against a server prints "View run ... at URL" to stdout, where `taskcodec train`
# prints only the run id (RUN=$(taskcodec train ...)); the URL is in the UI anyway.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT


def check_artifact_location(location: str, experiment: str, uri: str) -> None:
    """Refuse, in one line with its fix, an artifact location this process cannot write to.

    The usual case: ``mlflow ui`` / ``mlflow server`` created the sqlite store, so an
    experiment keeps its artifacts at ``mlflow-artifacts:/ID``, which only that server can
    write, while runs go straight to the sqlite file: every checkpoint upload would fail after
    training. Checked when a run starts, not found out at its end.
    """
    from urllib.parse import urlsplit

    if location.startswith("mlflow-artifacts:") and not uri.startswith(("http://", "https://")):
        raise TrackingError(
            f"experiment {experiment!r} keeps its artifacts at {location}, which only an MLflow "
            f"server can write, but runs go straight to {uri}: start the server (make "
            "mlflow-ui) and set MLFLOW_TRACKING_URI=http://127.0.0.1:5000, or name another "
            "experiment with MLFLOW_EXPERIMENT_NAME (a new one keeps artifacts in ./mlruns)")
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        return
    folder = Path(parts.path if parts.scheme else location)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK)):
        raise TrackingError(f"experiment {experiment!r} keeps its artifacts at {location}, "
                            f"but {existing} is not a writable folder: fix it or name "
                            "another experiment with MLFLOW_EXPERIMENT_NAME")


def check_run_artifacts(run_id: str, uri: str) -> None:
    """:func:`check_artifact_location` for a run that exists (one ``mlflow run`` created)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    check_artifact_location(run.info.artifact_uri, experiment.name, uri)


def check_experiment_artifacts(name: str, uri: str) -> None:
    """:func:`check_artifact_location` for the experiment a new run will go to, if it exists."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is not None:
        check_artifact_location(experiment.artifact_location, name, uri)


def check_run_destination(uri: str) -> None:
    """Check, before any work, where :func:`start_run` will put the run's artifacts."""
    run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
    if run_id:
        check_run_artifacts(run_id, uri)
    else:
        check_experiment_artifacts(experiment_name(), uri)


def start_run(run_name: str = ""):
    """Start (or, under ``mlflow run``, take over) this process's MLflow run.

    ``mlflow run`` creates the run and names it in ``$MLFLOW_RUN_ID``: that run is used as it
    is, in whatever experiment it was created (setting ours first would make MLflow refuse it
    as belonging to another experiment).
    """
    import mlflow

    run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
    if run_id:
        return mlflow.start_run(run_id=run_id)
    mlflow.set_experiment(experiment_name())
    return mlflow.start_run(run_name=run_name or None)


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line with its fix, when an HTTP tracking server does not answer or
    refuses our credentials (HTTP 401: missing or wrong ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``)."""
    if not uri.startswith(("http://", "https://")):
        return
    from taskcodec.server_probe import probe_credentials, probe_health

    probe_health(uri, timeout)
    probe_credentials(uri, timeout)


def git_commit(path: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path.cwd(),
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_tags() -> dict[str, str]:
    """Tags that tie a run to where it ran: code version, Slurm job, Kubernetes pod.

    Only the variables named here are read: credentials in the environment (MLflow's
    ``MLFLOW_TRACKING_PASSWORD``/``_TOKEN``, cloud keys) can never become tags.
    """
    tags: dict[str, str] = {}
    commit = os.environ.get("TASKCODEC_GIT_COMMIT") or git_commit(Path(__file__).parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id"),
                     ("SLURM_JOB_NODELIST", "slurm_nodelist"),
                     ("TASKCODEC_K8S_POD", "k8s_pod"), ("TASKCODEC_K8S_JOB", "k8s_job"),
                     ("TASKCODEC_IMAGE", "image")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def dataset_entity(info: Mapping[str, Any]):
    """The MLflow dataset ``info`` describes (``data``, ``data_name``, ``split``,
    ``data_digest``: :func:`taskcodec.evaluate.data_info` or ``listing_info``)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset

    source = CodeDatasetSource({"data": info["data"], "split": info["split"]})
    return Dataset(name=f"{info['data_name']}-{info['split']}", digest=info["data_digest"],
                   source_type="code", source=source.to_json())


def log_datasets(client, run_id: str, items) -> None:
    """Log data sets as the run's inputs, shown in the UI's Datasets column. ``items``: pairs
    (info as for :func:`dataset_entity`, context: training, validation or evaluation)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(run_id, datasets=[
        DatasetInput(dataset_entity(info), [InputTag(MLFLOW_DATASET_CONTEXT, context),
                                            InputTag("images", str(info["images"])),
                                            InputTag("split", str(info["split"]))])
        for info, context in items])


def metrics_interval_from_env() -> float:
    """``$TASKCODEC_METRICS_INTERVAL``: least seconds between two metric calls (default 2)."""
    raw = os.environ.get("TASKCODEC_METRICS_INTERVAL", "").strip()
    if not raw:
        return 2.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise TrackingError(f"TASKCODEC_METRICS_INTERVAL={raw!r} is not a number of seconds "
                            "between 0 and 3600")
    return value


#: MLflow's limit of metrics in one log_batch call.
MAX_BATCH = 1000


@dataclass
class _Item:
    kind: str  # "metrics" | "artifact" | "params" | "tags" | "inputs"
    payload: Any
    attempts: int = 0


_FLUSH = _Item("flush", None)  # queued by flush(): nothing to send


class RunLogger:
    """Asynchronous, retrying logger bound to one MLflow run."""

    def __init__(self, run_id: str, *, uri: str | None = None, spool_dir: Path | None = None,
                 skip_until_step: int = -1, max_backoff: float = 30.0,
                 metrics_interval: float | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri or tracking_uri())
        self.spool_dir = spool_dir
        self.skip_until_step = skip_until_step
        self.max_backoff = max_backoff
        #: Metrics go out at most once per this many seconds, what came meanwhile in one batch:
        #: each call costs a transaction on the server and Python work under the GIL that the
        #: training thread waits for (benchmark 1 in BENCHMARKS.md).
        self.metrics_interval = (metrics_interval if metrics_interval is not None
                                 else metrics_interval_from_env())
        self._last_metrics = -float("inf")
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._pending: list[_Item] = []
        self._failed_once = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    # -- producer side (training thread): never blocks on the network ----------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if step <= self.skip_until_step:
            return  # already logged before a restart: keep the first values, no duplicates
        ts = int(time.time() * 1000)
        self._put(_Item("metrics", [(k, float(v), ts, step) for k, v in metrics.items()]))

    def log_artifact(self, path: Path, artifact_path: str, *, remove_after: bool = False) -> None:
        """Upload ``path``; with ``remove_after``, delete it (and its folder, once empty) when
        the upload succeeded, so that snapshot copies do not pile up on disk."""
        self._put(_Item("artifact", (Path(path), artifact_path, remove_after)))

    def log_params(self, params: Mapping[str, str]) -> None:
        self._put(_Item("params", dict(params)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._put(_Item("tags", dict(tags)))

    def log_datasets(self, items) -> None:
        """See :func:`log_datasets` (the info dicts are copied: they may be spooled as JSON)."""
        self._put(_Item("inputs", [(dict(info), context) for info, context in items]))

    def _put(self, item: _Item) -> None:
        self._idle.clear()
        self._queue.put(item)

    # -- consumer side ------------------------------------------------------------------------
    def _metrics_head(self) -> int:
        """How many items at the head of the pending list are metrics that fit one batch."""
        count = records = 0
        for item in self._pending:
            if item.kind != "metrics" or (count and records + len(item.payload) > MAX_BATCH):
                break
            count, records = count + 1, records + len(item.payload)
        return count

    def _collect(self, seconds: float) -> bool:
        """Move what arrives in the next ``seconds`` to the pending list; True on close()."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if item is None:
                return True
            if item is _FLUSH:
                return False  # someone waits in flush(): send now
            self._pending.append(item)
        return False

    def _send(self, item: _Item) -> int:
        """Send ``item`` (with the metrics items right after it, if it is one); returns how many
        pending items went out."""
        from mlflow.entities import Metric, Param, RunTag

        if item.kind == "metrics":
            count = self._metrics_head()
            metrics = [Metric(k, v, ts, step) for i in self._pending[:count]
                       for k, v, ts, step in i.payload]
            self.client.log_batch(self.run_id, metrics=metrics)
            self._last_metrics = time.monotonic()
            return count
        elif item.kind == "params":
            self.client.log_batch(self.run_id,
                                  params=[Param(k, str(v)) for k, v in item.payload.items()])
        elif item.kind == "tags":
            self.client.log_batch(self.run_id,
                                  tags=[RunTag(k, str(v)) for k, v in item.payload.items()])
        elif item.kind == "inputs":
            log_datasets(self.client, self.run_id, item.payload)
        else:
            path, artifact_path, remove_after = item.payload
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            if remove_after:
                path.unlink(missing_ok=True)
                try:
                    path.parent.rmdir()
                except OSError:
                    pass  # not empty: someone else's files
        return 1

    def _work(self) -> None:
        stop = False
        while not stop or self._pending:
            try:
                item = self._queue.get(timeout=0.2 if self._pending else None)
                if item is None:
                    stop = True
                elif item is not _FLUSH:
                    self._pending.append(item)
            except queue.Empty:
                pass
            while self._pending:
                item = self._pending[0]
                wait = self._last_metrics + self.metrics_interval - time.monotonic()
                if item.kind == "metrics" and not stop and wait > 0 and not item.attempts:
                    stop = self._collect(wait)
                try:
                    del self._pending[:self._send(item)]
                    if self._failed_once:
                        log.warning("tracking server reachable again; pending logs sent")
                        self._failed_once = False
                except Exception as err:  # network errors of any client layer
                    item.attempts += 1
                    if not self._failed_once:
                        log.warning("MLflow logging failed (%s); training goes on, retrying",
                                    str(err).splitlines()[0][:200])
                        self._failed_once = True
                    if stop and item.attempts > 3:
                        return  # give up at shutdown; close() spools the rest
                    time.sleep(min(self.max_backoff, 0.5 * 2 ** min(item.attempts, 6)))
                    break
            if self._queue.empty() and not self._pending:
                self._idle.set()

    def unsent_metrics(self) -> list[tuple[str, float, int, int]]:
        """Metrics not yet confirmed sent, as ``(key, value, timestamp, step)``.

        A checkpoint keeps them: if the process is killed before they reach the server, the
        resumed run sends them (:meth:`resend_metrics`) instead of leaving a gap in its history.
        """
        with self._queue.mutex:  # the queue first: an item moves from it to _pending, never back
            queued = list(self._queue.queue)
        items = queued + list(self._pending)
        seen = {}
        for item in items:
            if item is not None and item.kind == "metrics":  # _FLUSH's kind is "flush"
                for record in item.payload:
                    seen[(record[0], record[3])] = tuple(record)
        return list(seen.values())

    def resend_metrics(self, records) -> int:
        """Queue the metrics a checkpoint kept, except those the run already has; returns how
        many were queued."""
        records = [tuple(r) for r in records]
        logged = {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)),
                           default=-1) for key in {r[0] for r in records}}
        fresh = [r for r in records if r[3] > logged[r[0]]]
        if fresh:
            self._put(_Item("metrics", fresh))
        return len(fresh)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued so far was sent; False if it could not be in time."""
        self._queue.put(_FLUSH)  # cuts short the wait for more metrics
        return self._idle.wait(timeout)

    def close(self, timeout: float = 60.0) -> list[str]:
        """Send what is left (bounded wait) and stop; spool the rest to disk.

        Returns the descriptions of what could not be sent (empty when all went through).
        """
        self._queue.put(None)
        self._thread.join(timeout)
        left = list(self._pending)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and item is not _FLUSH:
                left.append(item)
        if not left:
            return []
        lost = [f"{i.kind}: {i.payload if i.kind != 'metrics' else len(i.payload)}" for i in left]
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            spool = self.spool_dir / f"unsent-{self.run_id}.json"
            records = [{"kind": i.kind, "payload": [str(p) for p in i.payload[:2]]
                        if i.kind == "artifact" else i.payload} for i in left]
            spool.write_text(json.dumps(records))
            log.warning("could not send %d logging calls to MLflow; kept in %s "
                        "(checkpoints stay in %s)", len(left), spool, self.spool_dir)
        return lost


def logged_max_step(run_id: str, key: str = "loss", uri: str | None = None) -> int:
    """The last step for which ``key`` was logged in a run (-1 if none)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri or tracking_uri()).get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def download_artifact(run_id: str, artifact_path: str, dst: Path,
                      uri: str | None = None) -> Path:
    """Fetch one artifact of a run; a clear error when the run or the artifact does not exist."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or tracking_uri())
    try:
        client.get_run(run_id)
    except Exception as err:
        raise TrackingError(f"no MLflow run {run_id!r} at {client.tracking_uri}: "
                            f"{str(err).splitlines()[0][:200]}") from None
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, artifact_path, str(dst)))
    except Exception as err:
        raise TrackingError(f"run {run_id} has no artifact {artifact_path!r} "
                            f"({str(err).splitlines()[0][:200]})") from None


def run_has_artifact(run_id: str, artifact_path: str, uri: str | None = None) -> bool:
    from mlflow.tracking import MlflowClient

    folder, _, name = artifact_path.rpartition("/")
    client = MlflowClient(tracking_uri=uri or tracking_uri())
    try:
        return any(Path(f.path).name == name for f in client.list_artifacts(run_id, folder or None))
    except Exception:
        return False
