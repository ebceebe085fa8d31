"""scripts/mlflow-server and the ``mlflow_server`` fixture, against a real MLflow server."""

from __future__ import annotations

import os
import socket
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.server


def http_get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    with opener.open(url, timeout=10) as response:
        return response.status, response.read()


def port_is_free(port: int) -> bool:
    """True if a listener could bind 127.0.0.1:PORT now (SO_REUSEADDR, as servers do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Pids of the processes in group PGID, read from /proc (zombies included)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def test_fixture_server_answers_health_on_loopback(mlflow_server):
    assert urlsplit(mlflow_server.uri).hostname == "127.0.0.1"
    assert http_get(mlflow_server.uri + "/health") == (200, b"OK")
    assert (mlflow_server.dir / "mlflow.db").is_file()
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server.uri  # set by the autouse fixture


def test_run_round_trips_through_server_and_artifacts_land_in_its_folder(mlflow_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    payload = f"taskcodec artifact {uuid.uuid4()}\n".encode()
    (tmp_path / "notes.txt").write_bytes(payload)

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("test-mlflow-server-round-trip")
    with mlflow.start_run() as run:
        mlflow.log_param("codec", "bmshj2018-factorized")
        mlflow.log_metric("bpp", 0.25, step=1)
        mlflow.log_metric("bpp", 0.5, step=2)
        mlflow.log_artifact(str(tmp_path / "notes.txt"), artifact_path="reports")
    run_id = run.info.run_id

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"codec": "bmshj2018-factorized"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "bpp")] == [(1, 0.25), (2, 0.5)]
    assert stored.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/notes.txt"]

    on_server = [p for p in mlflow_server.artifacts.rglob("notes.txt") if run_id in p.parts]
    assert len(on_server) == 1
    assert on_server[0].read_bytes() == payload
    downloaded = client.download_artifacts(run_id, "reports/notes.txt", str(tmp_path / "back"))
    assert Path(downloaded).read_bytes() == payload


@pytest.mark.slow  # starts a second server of its own (about 8 s)
def test_stop_ends_the_whole_process_group_and_frees_the_port(server_script, tmp_path):
    port = unused_port()
    start = server_script("start", "--dir", str(tmp_path), "--port", str(port))
    try:
        assert start.returncode == 0, start.stderr
        assert start.stdout == f"http://127.0.0.1:{port}\n"
        pgid = int((tmp_path / "server.pid").read_text())
        assert os.getpgid(pgid) == pgid  # the pid file names the group leader
        members = group_members(pgid)
        assert len(members) >= 2  # mlflow's launcher and its uvicorn worker
        assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
        assert not port_is_free(port)
    finally:
        stop = server_script("stop", "--dir", str(tmp_path))

    assert stop.returncode == 0, stop.stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    for pid in members:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "server.pid").exists()
    assert port_is_free(port)

    again = server_script("stop", "--dir", str(tmp_path))
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_start_refuses_a_port_in_use_with_one_clear_line(mlflow_server, server_script, tmp_path):
    port = urlsplit(mlflow_server.uri).port
    start = server_script("start", "--dir", str(tmp_path), "--port", str(port), timeout=30)
    assert start.returncode == 1
    assert start.stdout == ""
    assert start.stderr.strip().splitlines() == [
        f"mlflow-server: error: port {port} on 127.0.0.1 is already in use; "
        "choose another --port or leave it out to get a free one"
    ]
    assert not (tmp_path / "server.pid").exists()
    assert http_get(mlflow_server.uri + "/health")[0] == 200  # the other server is untouched


def test_stop_without_a_server_is_a_quiet_success(server_script, tmp_path):
    stop = server_script("stop", "--dir", str(tmp_path / "never-started"))
    assert (stop.returncode, stop.stdout, stop.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "a command is needed: start or stop"),
        (("start",), "start needs --dir DIR"),
        (("start", "--dir", "x", "--port", "70000"), "--port must be 1..65535, got '70000'"),  # x: in tmp
        (("start", "--dir", "x", "--bogus"), "unknown option for start: '--bogus'"),
        (("restart",), "unknown command 'restart'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(server_script, tmp_path, args, message):
    result = server_script(*(str(tmp_path / "x") if a == "x" else a for a in args), timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"mlflow-server: error: {message} (see 'mlflow-server --help')"]
    assert not (tmp_path / "x").exists()


def test_help_describes_both_commands(server_script):
    result = server_script("--help", timeout=30)
    assert result.returncode == 0
    assert "start --dir DIR" in result.stdout and "stop --dir DIR" in result.stdout
