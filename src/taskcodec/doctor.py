"""``taskcodec doctor``: is this machine ready to log runs? Four checks, in seconds.

1. server       the tracking server answers ``/health`` (a local sqlite store needs none)
2. credentials  it accepts our login for an API call (HTTP 401 = missing or wrong credentials)
3. experiment   ``$MLFLOW_EXPERIMENT_NAME`` (or ``taskcodec``) exists and is active; a missing
                one is created, as the first training run would do
4. artifacts    a tiny file goes up into a throwaway run of that experiment and comes back
                byte for byte; the file and the run are deleted afterwards. This also proves
                the account may create runs there (HTTP 403 otherwise).

Why a command and not a page of troubleshooting: a job on a cluster fails late and far away;
these checks fail early, here, each with one line that says what to change. A check whose
precondition failed is skipped, not failed, so the first failure is the one to fix.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from taskcodec import tracking
from taskcodec.server_probe import ServerProblem, probe_credentials, probe_health

OK, FAIL, SKIP = "ok", "fail", "skip"
DOCTOR_TAG = "taskcodec.doctor"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``detail`` says what was found, ``fix`` what to do (on fail)."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {OK: "ok  ", FAIL: "FAIL", SKIP: "skip"}[self.status]
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{mark} {self.name:<12} {self.detail}{fix}"


def display_uri(uri: str) -> str:
    """The URI with any password in it masked, fit to print."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def http_status(err: Exception) -> int | None:
    """The HTTP status behind an MLflow client error, when there was one."""
    match = re.search(r"error code (\d{3})", str(err))
    if match:
        return int(match.group(1))
    code = getattr(err, "error_code", None)
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_DOES_NOT_EXIST"):
        return {"PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401,
                "RESOURCE_DOES_NOT_EXIST": 404}[code]
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:200]


@contextlib.contextmanager
def _quick_http(timeout: float) -> Iterator[None]:
    """MLflow's client without its retries and with our timeout, for the checks only."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout)))}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_server(uri: str, timeout: float) -> Check:
    if not uri.startswith(("http://", "https://")):
        return Check("server", OK, f"local store {display_uri(uri)}: no server needed")
    try:
        probe_health(uri, timeout)
    except ServerProblem as err:
        return Check("server", FAIL, err.problem, err.fix)
    return Check("server", OK, f"{display_uri(uri)} answers /health")


def check_credentials(uri: str, timeout: float) -> Check:
    if not uri.startswith(("http://", "https://")):
        return Check("credentials", SKIP, "a local store needs no login")
    try:
        creds = probe_credentials(uri, timeout)
    except ServerProblem as err:
        return Check("credentials", FAIL, err.problem, err.fix)
    if not creds.headers:
        return Check("credentials", OK, "no credentials set, and this server asks for none "
                                        "(it has no authentication)")
    return Check("credentials", OK, f"{creds.who} accepted")


def _denied(name: str, what: str, experiment: str) -> Check:
    return Check(name, FAIL, f"this account may not {what} experiment {experiment!r} (HTTP 403)",
                 "ask the experiment's owner or an admin to grant you EDIT on it, or set "
                 "MLFLOW_EXPERIMENT_NAME to an experiment of your own")


def check_experiment(client, experiment: str) -> tuple[Check, str | None]:
    """The experiment's state; creates a missing one. Returns the check and the experiment id."""
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment)
            return Check("experiment", OK, f"{experiment!r} did not exist; created it "
                                           f"(id {experiment_id}), as the first run would"), \
                experiment_id
    except Exception as err:
        if http_status(err) == 403:
            return _denied("experiment", "read or create", experiment), None
        return Check("experiment", FAIL, f"cannot look up experiment {experiment!r}: "
                                         f"{_first_line(err)}", "see the server's log"), None
    if found.lifecycle_stage == "deleted":
        return Check("experiment", FAIL, f"experiment {experiment!r} (id {found.experiment_id}) "
                                         "is deleted",
                     f"restore it (mlflow experiments restore --experiment-id "
                     f"{found.experiment_id}) or set MLFLOW_EXPERIMENT_NAME to another name"), None
    return Check("experiment", OK, f"{experiment!r} exists (id {found.experiment_id})"), \
        found.experiment_id


def _artifact_fix(artifact_uri: str) -> str:
    if artifact_uri.startswith("mlflow-artifacts:"):
        return ("the server cannot use its artifact store: check its --artifacts-destination "
                "bucket, MLFLOW_S3_ENDPOINT_URL and S3 credentials (see the server's log)")
    scheme = urlsplit(artifact_uri).scheme
    if scheme in ("", "file"):
        return "check that this folder can be written (disk full? permissions?)"
    return (f"this client writes {scheme}: artifacts itself: give it that store's credentials "
            "(e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL), or have "
            "the server proxy artifacts (--artifacts-destination)")


def check_artifacts(client, uri: str, experiment: str, experiment_id: str) -> Check:
    """Upload a small random file into a throwaway run, download it, compare, clean up."""
    try:
        run = client.create_run(experiment_id, run_name="taskcodec-doctor",
                                tags={DOCTOR_TAG: "round trip of a test artifact; deleted"})
    except Exception as err:
        if http_status(err) == 403:
            return _denied("artifacts", "create runs in", experiment)
        return Check("artifacts", FAIL, f"cannot create a test run in {experiment!r}: "
                                        f"{_first_line(err)}", "see the server's log")
    run_id, artifact_uri = run.info.run_id, run.info.artifact_uri
    payload = secrets.token_bytes(64)
    try:
        with tempfile.TemporaryDirectory(prefix="taskcodec-doctor-") as tmp:
            src = Path(tmp) / "roundtrip.bin"
            src.write_bytes(payload)
            try:
                client.log_artifact(run_id, str(src), "doctor")
                back = Path(client.download_artifacts(run_id, "doctor/roundtrip.bin",
                                                       str(Path(tmp) / "back")))
            except Exception as err:
                return Check("artifacts", FAIL, f"artifact round trip via {artifact_uri} failed: "
                                                f"{_first_line(err)}", _artifact_fix(artifact_uri))
            if back.read_bytes() != payload:
                return Check("artifacts", FAIL, f"the artifact downloaded from {artifact_uri} "
                                                "differs from the one uploaded",
                             "the artifact store returns other bytes; see the server's log")
    finally:
        leftover = _clean_up(client, uri, run_id, artifact_uri)
    scheme = urlsplit(artifact_uri).scheme
    where = ("through the server (mlflow-artifacts:)" if scheme == "mlflow-artifacts"
             else f"in the local folder {artifact_uri}" if scheme in ("", "file")
             else f"directly in {scheme}: storage")
    note = f"; {leftover}" if leftover else "; test run deleted"
    return Check("artifacts", OK, f"{len(payload)} bytes uploaded and downloaded {where}{note}")


def _clean_up(client, uri: str, run_id: str, artifact_uri: str) -> str:
    """Delete the test file and run; returns what could not be deleted ('' when all went)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    left = []
    try:
        get_artifact_repository(artifact_uri, tracking_uri=uri).delete_artifacts("doctor")
    except Exception:
        left.append(f"test artifact left in {artifact_uri}/doctor")
    try:
        client.delete_run(run_id)
    except Exception:
        left.append(f"test run {run_id} left (tag {DOCTOR_TAG})")
    return ", ".join(left)


def run_checks(uri: str | None = None, experiment: str | None = None,
               timeout: float = 10.0) -> list[Check]:
    """All four checks against ``uri`` (default: the tracking URI taskcodec would use)."""
    uri = uri or tracking.tracking_uri()
    experiment = experiment or tracking.experiment_name()
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    checks = [check_server(uri, timeout)]
    checks.append(check_credentials(uri, timeout) if checks[-1].status == OK
                  else Check("credentials", SKIP, "the server did not answer"))
    if checks[-1].status == FAIL or checks[0].status == FAIL:
        reason = "the server did not answer" if checks[0].status == FAIL else "no valid login"
        return checks + [Check("experiment", SKIP, reason), Check("artifacts", SKIP, reason)]
    from mlflow.tracking import MlflowClient

    with _quick_http(timeout):
        client = MlflowClient(tracking_uri=uri)
        check, experiment_id = check_experiment(client, experiment)
        checks.append(check)
        if experiment_id is None:
            checks.append(Check("artifacts", SKIP, "no usable experiment"))
        else:
            checks.append(check_artifacts(client, uri, experiment, experiment_id))
    return checks


def passed(checks: list[Check]) -> bool:
    return all(c.status != FAIL for c in checks)


def report(uri: str, experiment: str, checks: list[Check]) -> dict[str, Any]:
    """The results as one JSON-ready dict (``taskcodec doctor --json``)."""
    return {"ok": passed(checks), "tracking_uri": display_uri(uri), "experiment": experiment,
            "checks": [asdict(c) for c in checks]}
