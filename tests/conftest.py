"""Shared fixtures: an isolated environment for every test, and one real MLflow server per session.

Every test runs with its own tracking store, data cache and quiet progress bars, so tests neither
see the developer's MLflow settings nor leave anything in the work tree. Tests that need a real
tracking server ask for ``mlflow_server``: it is started once per session with
``scripts/mlflow-server`` (so the script is exercised too) and always stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "scripts" / "mlflow-server"
# Start-up takes about 10 s on a small machine; the script gives up after 90 s on its own.
SERVER_SCRIPT_TIMEOUT_S = 150

# Variables from the developer's shell that would point a test at their own runs.
_LEAKY_MLFLOW_VARS = ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")


@dataclass(frozen=True)
class MlflowServer:
    """A running tracking server: clients use ``uri``; its files live in ``dir``."""

    uri: str  # http://127.0.0.1:PORT
    dir: Path  # holds mlflow.db, server.pid and server.log
    artifacts: Path  # where the server stores proxied (mlflow-artifacts:) artifacts


def mlflow_executable() -> Path:
    """The ``mlflow`` of the interpreter running the tests, so server and client match.

    ``sys.executable`` is not resolved: in a venv it is a symlink to the base interpreter,
    whose folder has no mlflow.
    """
    return Path(sys.executable).parent / "mlflow"


def run_server_script(*args: str, timeout: float = SERVER_SCRIPT_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``scripts/mlflow-server ARGS`` with the tests' mlflow; returns the finished process."""
    env = {**os.environ, "MLFLOW_BIN": str(mlflow_executable()), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [str(SERVER_SCRIPT), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def server_script():
    """``run_server_script`` as a fixture, for tests that start their own servers."""
    return run_server_script


def _stop_server(directory: Path) -> None:
    stop = run_server_script("stop", "--dir", str(directory), timeout=60)
    if stop.returncode != 0:
        # A teardown must not hide the test's own result; say it loudly instead.
        print(f"\nmlflow-server stop --dir {directory} failed: {stop.stderr.strip()}", file=sys.stderr)


def _term_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real MLflow server on 127.0.0.1 for the whole session (sqlite store, proxied artifacts).

    It is stopped at session end, also after Ctrl-C: pytest then still tears down fixtures.
    While it runs, SIGTERM (a CI runner cancelling the job) is turned into KeyboardInterrupt
    for the same reason, if nobody else handles SIGTERM.
    """
    if not mlflow_executable().is_file():
        pytest.fail(f"no mlflow executable next to {sys.executable}", pytrace=False)
    directory = tmp_path_factory.mktemp("mlflow-server")
    previous_term = signal.getsignal(signal.SIGTERM)
    if previous_term is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _term_as_interrupt)
    try:
        start = run_server_script("start", "--dir", str(directory))
        if start.returncode != 0:
            pytest.fail(f"scripts/mlflow-server start failed:\n{start.stderr}", pytrace=False)
        yield MlflowServer(uri=start.stdout.strip(), dir=directory, artifacts=directory / "artifacts")
    finally:
        # Also after a failed, interrupted or timed-out start: the server may be up by then.
        _stop_server(directory)
        if previous_term is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: Markers (and fixtures) of tests that are never quick: `pytest -m "not slow"` leaves them out.
_SLOW_MARKERS = ("server", "image")
_SLOW_FIXTURES = {"mlflow_server", "server_script"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items) -> None:
    """A test that starts a server, a cluster, a browser or an image build is also slow."""
    for item in items:
        if (any(item.get_closest_marker(m) for m in _SLOW_MARKERS)
                or _SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)


def _reset_mlflow_globals() -> None:
    """Undo what a test did through MLflow's module-level (fluent) state.

    Only if the test imported mlflow: importing it here would slow every test.
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run(status="KILLED")
    mlflow.set_tracking_uri(None)  # back to reading MLFLOW_TRACKING_URI
    # set_experiment() keeps the choice in a module global that has no public reset.
    mlflow.tracking.fluent._active_experiment_id = None


def _test_env(mp: pytest.MonkeyPatch, tracking_uri: str, work: Path) -> None:
    """The environment every test runs in: its tracking store, its data cache under ``work``,
    none of the caller's experiment or run variables, quiet progress bars."""
    mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    for name in _LEAKY_MLFLOW_VARS:
        mp.delenv(name, raising=False)
    mp.setenv("TASKCODEC_DATA_CACHE", str(work / "data-cache"))
    mp.setenv("TQDM_DISABLE", "1")
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("GIT_PYTHON_REFRESH", "quiet")  # mlflow probes for git; no warning if absent


@pytest.fixture(autouse=True)
def isolated_env(request, monkeypatch, tmp_path):
    """Give each test its own tracking store and data cache, and silence the noisy parts.

    ``MLFLOW_TRACKING_URI`` is a fresh sqlite file under ``tmp_path``, or the session server's
    URI when the test uses ``mlflow_server``. Experiment and run variables from the caller's
    shell are removed, so runs go where the test says. Add new variables in ``_test_env``.
    """
    if "mlflow_server" in request.fixturenames:
        tracking_uri = request.getfixturevalue("mlflow_server").uri
    else:
        tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _test_env(monkeypatch, tracking_uri, tmp_path)
    yield
    _reset_mlflow_globals()


@contextlib.contextmanager
def _module_env(tracking_uri: str, work: Path, experiment: str) -> Iterator[None]:
    """What ``isolated_env`` gives a test, for a module-scoped fixture that trains: runs go to
    ``tracking_uri`` under ``experiment``, ``work`` is the working and temporary folder
    (checkpoints land in ./checkpoints, a sqlite store's artifacts in ./mlruns)."""
    with pytest.MonkeyPatch.context() as mp:
        _test_env(mp, tracking_uri, work)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
        mp.setattr(tempfile, "tempdir", str(work))
        mp.chdir(work)
        try:
            yield
        finally:
            _reset_mlflow_globals()


@pytest.fixture(scope="session")
def module_env():
    """``_module_env`` as a fixture: ``with module_env(uri, folder, "experiment"): train(...)``."""
    return _module_env


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """One torch thread for the test: tiny models gain nothing from threads, and on a busy
    machine waiting for a second core makes each step many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
