"""Quick probes of an MLflow tracking server, made the way MLflow's own client would make them.

Why not just call the MLflow client: its errors are long, arrive only at the first real call
(often after a model was built) and say nothing about what to change. These probes take well
under a second, send the same credentials as the client (``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` as HTTP basic auth, else ``MLFLOW_TRACKING_TOKEN`` as a bearer
token, with ``MLFLOW_TRACKING_INSECURE_TLS`` / ``MLFLOW_TRACKING_SERVER_CERT_PATH`` for TLS),
and turn every failure into one line: what is wrong, then how to fix it. Secrets are never part
of a message; a user is named, a password or token never.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from taskcodec.errors import TrackingError

#: An authenticated call every MLflow server answers, with or without the auth app, and that
#: any account may make (it lists only what the account may read).
AUTH_PROBE = ("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 1})


class ServerProblem(TrackingError):
    """A tracking server check failed; ``problem`` says what, ``fix`` what to do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; fix: {fix}")
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class Credentials:
    """What the client sends, and a description of it that is safe to print."""

    headers: dict[str, str] = field(default_factory=dict)
    who: str = "no credentials"
    username: str = ""


def credentials_from_env(environ: Mapping[str, str] | None = None) -> Credentials:
    """The Authorization header MLflow's client builds from the environment (same precedence)."""
    env = os.environ if environ is None else environ
    user = env.get("MLFLOW_TRACKING_USERNAME", "")
    password = env.get("MLFLOW_TRACKING_PASSWORD", "")
    token = env.get("MLFLOW_TRACKING_TOKEN", "")
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return Credentials({"Authorization": f"Basic {basic}"}, f"user {user!r}", user)
    if token:
        return Credentials({"Authorization": f"Bearer {token}"}, "the token in MLFLOW_TRACKING_TOKEN")
    if user:
        return Credentials(who=f"user {user!r} without a password", username=user)
    return Credentials()


def _ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext | None:
    if environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        return ssl.create_default_context(cafile=environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    return None


def http_call(uri: str, path: str, *, method: str = "GET", body: dict | None = None,
              timeout: float = 10.0, credentials: Credentials | None = None) -> tuple[int, bytes]:
    """One request to the server; HTTP errors are returned as a status, not raised.

    Raises ``OSError`` (``urllib.error.URLError`` is one) when nothing answers.
    """
    creds = credentials_from_env() if credentials is None else credentials
    data = None if body is None else json.dumps(body).encode()
    headers = {**creds.headers, **({"Content-Type": "application/json"} if data else {})}
    req = urllib.request.Request(uri.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_ssl_context(os.environ)) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _first_line(payload: bytes) -> str:
    """The message of an MLflow error body (JSON or text), shortened to one line."""
    text = payload.decode("utf-8", "replace").strip()
    try:
        text = str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        pass
    return (text.splitlines() or [""])[0][:160]


def login_problem(uri: str, creds: Credentials) -> ServerProblem:
    """The HTTP 401 explanation for the credentials that were sent."""
    if creds.headers.get("Authorization", "").startswith("Basic"):
        return ServerProblem(f"tracking server {uri} refused the login of {creds.who} (HTTP 401)",
                             "check MLFLOW_TRACKING_PASSWORD (and the user name); the server's "
                             "admin can reset it")
    if creds.headers:
        return ServerProblem(f"tracking server {uri} refused {creds.who} (HTTP 401)",
                             "renew the token, or log in with MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD")
    if creds.username:
        return ServerProblem(f"tracking server {uri} requires a login and MLFLOW_TRACKING_USERNAME "
                             f"is set but MLFLOW_TRACKING_PASSWORD is not (HTTP 401)",
                             "set MLFLOW_TRACKING_PASSWORD too")
    return ServerProblem(f"tracking server {uri} requires a login (HTTP 401) and no credentials "
                         "are set", "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                         "(the server's admin creates accounts)")


def probe_health(uri: str, timeout: float = 10.0) -> None:
    """The server answers ``GET /health``; raises :class:`ServerProblem` otherwise."""
    creds = credentials_from_env()
    try:
        status, payload = http_call(uri, "/health", timeout=timeout, credentials=creds)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServerProblem(f"cannot reach the MLflow tracking server {uri}: {reason}",
                            "start it (make tracking-server), check MLFLOW_TRACKING_URI, or unset "
                            "it to use ./mlflow.db") from None
    if status == 401:  # a proxy in front of the server may guard /health too
        raise login_problem(uri, creds)
    if status != 200:
        raise ServerProblem(f"tracking server {uri} answered /health with HTTP {status} "
                            f"({_first_line(payload)})",
                            "see the server's log; is MLFLOW_TRACKING_URI the server's address?")


def probe_credentials(uri: str, timeout: float = 10.0) -> Credentials:
    """The server accepts our credentials for an API call; returns what was sent."""
    creds = credentials_from_env()
    method, path, body = AUTH_PROBE
    try:
        status, payload = http_call(uri, path, method=method, body=body, timeout=timeout,
                                    credentials=creds)
    except (urllib.error.URLError, OSError) as err:
        raise ServerProblem(f"tracking server {uri} did not answer an API call: "
                            f"{getattr(err, 'reason', err)}", "see the server's log") from None
    if status == 401:
        raise login_problem(uri, creds)
    if status == 403:
        raise ServerProblem(f"tracking server {uri} accepted {creds.who} but denies it the API "
                            "(HTTP 403)", "ask the server's admin for access")
    if status != 200:
        raise ServerProblem(f"tracking server {uri} answered an API call with HTTP {status} "
                            f"({_first_line(payload)})",
                            "see the server's log (is its database up?)")
    return creds
