"""The team tracking server, end to end, with real parts.

* PostgreSQL: the Debian ``postgresql`` binaries, a throwaway cluster on 127.0.0.1 made by
  ``scripts/postgres-test-server``; it holds the backend store and the accounts database.
* S3: moto's server mode (PyPI ``moto[server]``, the ``moto_server`` command) on 127.0.0.1
  stands in for MinIO/S3. It speaks the same S3 API to boto3, and the bucket really receives
  the bytes: the tests read the checkpoint back out of it.
* MLflow: ``scripts/tracking-server`` (basic-auth app, artifacts proxied into the bucket).
  Clients get only ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``; no bucket credentials.

One stack serves the whole module (about 20 s to start); each test uses its own experiment.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from taskcodec.server_probe import credentials_from_env, http_call

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
BIN = Path(sys.executable).parent  # the venv's bin: mlflow, moto_server, kubernetes-validate
TINY = ("--N", "8", "--M", "8", "--patch-size", "32", "--batch-size", "2",
        "--max-val-images", "1", "--max-side", "128")


# -- helpers ---------------------------------------------------------------------------------
def postgres_binaries() -> Path | None:
    """Where initdb lives, found as scripts/postgres-test-server finds it."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2):
            return True
    except OSError:
        return False


def run_script(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def taskcodec(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "taskcodec"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


@dataclass
class Team:
    """The running stack and the accounts on it."""

    uri: str
    pg_uri: str
    pg_dir: Path
    server_dir: Path
    s3_endpoint: str
    bucket: str
    passwords: dict[str, str]  # user -> password (admin, alice, bob)
    s3_secret: str  # the bucket's secret key: the server has it, clients do not
    secrets: list[str]  # every secret of the stack, for the leak checks
    data_cache: Path
    outputs: list[str] = field(default_factory=list)  # what clients printed, for the leak checks

    def env(self, user: str = "alice", *, experiment: str, password: str | None = None
            ) -> dict[str, str]:
        """A client's environment: the server, a login, an experiment; no bucket credentials."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_", "TASKCODEC_"))}
        env.update({"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_EXPERIMENT_NAME": experiment,
                    "MLFLOW_TRACKING_USERNAME": user,
                    "MLFLOW_TRACKING_PASSWORD": self.passwords[user] if password is None
                    else password,
                    "TASKCODEC_DATA_CACHE": str(self.data_cache),
                    "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
        return env

    def api(self, user: str | None, method: str, path: str, body: dict | None = None,
            password: str | None = None) -> tuple[int, dict | str]:
        env = {} if user is None else {"MLFLOW_TRACKING_USERNAME": user,
                                       "MLFLOW_TRACKING_PASSWORD": password or self.passwords[user]}
        status, payload = http_call(self.uri, path, method=method, body=body,
                                    credentials=credentials_from_env(env))
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode()

    def sql(self, query: str, *args) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(self.pg_uri, connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute(query, args)
            rows = cur.fetchall()
        conn.close()
        return rows

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id="taskcodec-test",
                            aws_secret_access_key=self.s3_secret)

    def steps(self, run_id: str, key: str) -> list[int]:
        return [r[0] for r in self.sql("SELECT step FROM metrics WHERE run_uuid = %s AND key = %s "
                                       "ORDER BY step", run_id, key)]


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    """PostgreSQL + moto S3 + the authenticated MLflow server, for the module; always stopped."""
    if postgres_binaries() is None:
        if os.geteuid() != 0:
            pytest.skip("PostgreSQL server binaries (initdb) not found and not root to install "
                        "them: install the Debian package 'postgresql' (make system-deps)")
        pytest.fail("PostgreSQL server binaries (initdb) not found: run `make system-deps` "
                    "(Debian package 'postgresql')", pytrace=False)
    work = Path(tempfile.mkdtemp(prefix="taskcodec-team-"))
    work.chmod(0o755)  # as root, the database runs as user postgres and must enter it
    pg_dir, server_dir = work / "postgres", work / "server"
    passwords = {u: f"{u}-{secrets.token_urlsafe(12)}" for u in ("admin", "alice", "bob")}
    s3_secret = f"s3-{secrets.token_urlsafe(12)}"
    base = {**os.environ, "MLFLOW_BIN": str(BIN / "mlflow"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    moto = None
    try:
        started = run_script(SCRIPTS / "postgres-test-server", "start", "--dir", pg_dir,
                             "--db", "mlflow", "--db", "mlflow_auth", env=base, timeout=120)
        assert started.returncode == 0, started.stderr
        pg_uri = started.stdout.strip()

        port = free_port()
        moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        s3_endpoint = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(s3_endpoint), "moto's S3 API", timeout=60)

        server_env = {**base, "TASKCODEC_BACKEND_STORE_URI": pg_uri,
                      "TASKCODEC_AUTH_DATABASE_URI": pg_uri.rsplit("/", 1)[0] + "/mlflow_auth",
                      "TASKCODEC_ARTIFACTS_DESTINATION": "s3://team-bucket/artifacts",
                      "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "taskcodec-test",
                      "AWS_SECRET_ACCESS_KEY": s3_secret, "AWS_DEFAULT_REGION": "us-east-1",
                      "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                      "MLFLOW_AUTH_ADMIN_PASSWORD": passwords["admin"]}
        team = Team(uri="", pg_uri=pg_uri, pg_dir=pg_dir, server_dir=server_dir,
                    s3_endpoint=s3_endpoint, bucket="team-bucket", passwords=passwords,
                    s3_secret=s3_secret,
                    secrets=[*passwords.values(), urlsplit(pg_uri).password, s3_secret],
                    data_cache=work / "data-cache")
        team.s3().create_bucket(Bucket=team.bucket)
        server = run_script(SCRIPTS / "tracking-server", "start", "--dir", server_dir,
                            "--port", str(free_port()), "--workers", "1", env=server_env)
        assert server.returncode == 0, server.stderr
        team.uri = server.stdout.strip()
        for user in ("alice", "bob"):  # accounts are made by the admin, through the auth API
            status, body = team.api("admin", "POST", "/api/2.0/mlflow/users/create",
                                    {"username": user, "password": passwords[user]})
            assert status == 200, body
        yield team
    finally:
        stop = run_script(SCRIPTS / "tracking-server", "stop", "--dir", server_dir, env=base)
        if moto is not None:
            _stop_group(moto)
        run_script(SCRIPTS / "postgres-test-server", "stop", "--dir", pg_dir, env=base)
        shutil.rmtree(work, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="module")
def trained(team: Team, tmp_path_factory) -> dict:
    """Alice trains a tiny codec on the team server, then evaluates it by run id."""
    cwd = tmp_path_factory.mktemp("alice")
    env = team.env("alice", experiment="team-e2e")
    train = taskcodec("train", *TINY, "--max-steps", "3", "--log-every", "1", env=env, cwd=cwd)
    team.outputs += [train.stdout, train.stderr]
    assert train.returncode == 0, train.stderr
    run_id = train.stdout.strip().splitlines()[-1]
    shutil.rmtree(cwd / "checkpoints")  # evaluate must fetch the checkpoint from the server
    evaluate = taskcodec("evaluate", "--checkpoint", run_id, "--max-images", "1", "--jpeg", "false",
                         env=env, cwd=cwd)
    team.outputs += [evaluate.stdout, evaluate.stderr]
    assert evaluate.returncode == 0, evaluate.stderr
    eval_id = re.search(r"MLflow run: ([0-9a-f]{32})", evaluate.stdout).group(1)
    (experiment_id,) = team.sql("SELECT experiment_id FROM experiments WHERE name = 'team-e2e'")[0]
    return {"run_id": run_id, "eval_id": eval_id, "experiment_id": str(experiment_id)}


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.server
def test_training_metrics_land_in_postgres_and_the_checkpoint_in_the_bucket(team, trained):
    import torch

    run_id = trained["run_id"]
    status, user = team.sql("SELECT status, user_id FROM runs WHERE run_uuid = %s", run_id)[0]
    assert (status, user) == ("FINISHED", "alice")  # the server records the logged-in user
    assert team.steps(run_id, "loss") == [1, 2, 3]
    assert team.steps(run_id, "val_loss") == [3]

    key = f"artifacts/{trained['experiment_id']}/{run_id}/artifacts/checkpoints/last.pt"
    listed = [o["Key"] for o in team.s3().list_objects_v2(Bucket=team.bucket)["Contents"]]
    assert key in listed
    body = team.s3().get_object(Bucket=team.bucket, Key=key)["Body"].read()
    checkpoint = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    assert checkpoint["run_id"] == run_id and checkpoint["step"] == 3


@pytest.mark.slow
@pytest.mark.server
def test_evaluate_by_run_id_fetched_the_checkpoint_through_the_server(team, trained):
    eval_id = trained["eval_id"]
    params = dict(team.sql("SELECT key, value FROM params WHERE run_uuid = %s", eval_id))
    assert params["checkpoint"] == trained["run_id"]
    (bpp,) = team.sql("SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'bpp'",
                      eval_id)[0]
    assert bpp > 0
    listed = team.s3().list_objects_v2(Bucket=team.bucket, Prefix="artifacts/")["Contents"]
    assert any(o["Key"].endswith(f"{eval_id}/artifacts/evaluation/per_image.csv") for o in listed)


@pytest.mark.slow
@pytest.mark.server
def test_a_registered_codec_is_evaluated_by_its_alias_through_the_team_server(
        team, trained, monkeypatch, tmp_path):
    from taskcodec import model_registry
    from taskcodec.config import EvalConfig
    from taskcodec.evaluate import evaluate

    for name, value in team.env("alice", experiment="team-e2e").items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    found = model_registry.publish(trained["run_id"], "team-codec", ["champion"])
    assert str(found) == "models:/team-codec/1"  # the model alice's training logged
    result = evaluate(EvalConfig(checkpoint="models:/team-codec@champion", max_images=1,
                                 max_side=128, jpeg=False))
    assert team.sql("SELECT name, version, run_id FROM model_versions") == [
        ("team-codec", 1, trained["run_id"])]
    assert team.sql("SELECT alias, version FROM registered_model_aliases") == [("champion", 1)]
    tags = dict(team.sql("SELECT key, value FROM tags WHERE run_uuid = %s", result["run_id"]))
    assert tags["evaluated_run_id"] == trained["run_id"]
    assert tags["evaluated_model"] == "team-codec/1"
    (digest,) = team.sql("SELECT digest FROM datasets d JOIN inputs i ON i.source_id = "
                         "d.dataset_uuid WHERE i.destination_id = %s", result["run_id"])[0]
    assert digest == result["data"]["data_digest"]


# -- security --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.server
def test_no_login_and_a_wrong_password_are_refused_with_401(team, trained):
    search = ("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 5})
    assert team.api(None, *search)[0] == 401
    assert team.api("alice", *search, password="not-" + team.passwords["alice"])[0] == 401
    assert team.api("mallory", *search, password="whatever-password")[0] == 401
    status, body = team.api("alice", *search)
    assert status == 200 and "team-e2e" in {e["name"] for e in body["experiments"]}
    assert team.api(None, "GET", "/health") == (200, "OK")  # probes need no login


@pytest.mark.slow
@pytest.mark.server
def test_check_reachable_names_the_login_problem_in_one_line(team, monkeypatch):
    from taskcodec import tracking
    from taskcodec.errors import TrackingError

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    with pytest.raises(TrackingError) as missing:
        tracking.check_reachable(team.uri)
    assert str(missing.value) == (
        f"tracking server {team.uri} requires a login (HTTP 401) and no credentials are set; "
        "fix: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the server's admin "
        "creates accounts)")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(TrackingError) as wrong:
        tracking.check_reachable(team.uri)
    message = str(wrong.value)
    assert "refused the login of user 'alice' (HTTP 401)" in message
    assert "MLFLOW_TRACKING_PASSWORD" in message and "wrong-password" not in message
    assert "\n" not in message
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.passwords["alice"])
    tracking.check_reachable(team.uri)  # the right password passes


@pytest.mark.slow
@pytest.mark.server
def test_another_user_may_read_but_not_modify_alices_experiment(team, trained):
    experiment_id, run_id = trained["experiment_id"], trained["run_id"]
    status, body = team.api("bob", "GET", f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}")
    assert status == 200 and body["experiment"]["name"] == "team-e2e"  # default permission READ
    attempts = [
        ("/api/2.0/mlflow/runs/create", {"experiment_id": experiment_id}),
        ("/api/2.0/mlflow/experiments/set-experiment-tag",
         {"experiment_id": experiment_id, "key": "owner", "value": "bob"}),
        ("/api/2.0/mlflow/runs/log-metric",
         {"run_id": run_id, "key": "loss", "value": 0.0, "timestamp": 0, "step": 99}),
        ("/api/2.0/mlflow/runs/delete", {"run_id": run_id}),
        ("/api/2.0/mlflow/experiments/delete", {"experiment_id": experiment_id}),
    ]
    for path, body in attempts:
        assert team.api("bob", "POST", path, body)[0] == 403, path
    assert team.sql("SELECT lifecycle_stage FROM runs WHERE run_uuid = %s", run_id) == [("active",)]
    assert team.steps(run_id, "loss") == [1, 2, 3]
    assert not team.sql("SELECT 1 FROM experiment_tags WHERE experiment_id = %s AND key = 'owner'",
                        int(experiment_id))

    checked = doctor(team.env("bob", experiment="team-e2e"))
    assert checked.exit_code == 1
    assert ("FAIL artifacts    this account may not create runs in experiment 'team-e2e' "
            "(HTTP 403); fix: ask the experiment's owner or an admin to grant you EDIT on it"
            ) in checked.stdout

    # The documented fix: an admin grants EDIT (bob cannot grant it himself); then bob may log.
    grant = ("POST", "/api/3.0/mlflow/users/permissions/grant",
             {"username": "bob", "resource_type": "experiment", "resource_id": experiment_id,
              "permission": "EDIT"})
    assert team.api("bob", *grant)[0] == 403
    status, body = team.api("admin", *grant)
    assert status == 200, body
    assert team.api("bob", "POST", "/api/2.0/mlflow/runs/create",
                    {"experiment_id": experiment_id})[0] == 200


@pytest.mark.slow
@pytest.mark.server
def test_credentials_appear_in_no_param_tag_log_or_command_line(team, trained):
    logged = team.sql(
        "SELECT key, value FROM params UNION ALL SELECT key, value FROM tags "
        "UNION ALL SELECT key, value FROM experiment_tags")
    assert len(logged) > 20  # the runs' params and tags are all there
    texts = {f"param/tag {k}": f"{k}={v}" for k, v in logged}
    texts.update({f"client output {i}": text for i, text in enumerate(team.outputs)})
    texts["server.log"] = (team.server_dir / "server.log").read_text()
    assert "MLFLOW_BACKEND_STORE_URI='postgresql+psycopg2://taskcodec:***@127.0.0.1:" \
        in texts["server.log"]  # the log names the store, password masked
    pgid = int((team.server_dir / "server.pid").read_text())
    for proc in Path("/proc").glob("[0-9]*"):  # the server's command lines, as `ps` shows them
        try:
            if os.getpgid(int(proc.name)) == pgid:
                texts[f"command line of {proc.name}"] = (proc / "cmdline").read_bytes().decode()
        except (OSError, ValueError):
            continue
    assert any(k.startswith("command line") for k in texts)
    for secret in team.secrets:
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"a secret appears in: {leaks}"
    for name in ("basic_auth.ini", "flask-secret-key"):  # hold the accounts db URI / CSRF key
        assert stat.S_IMODE((team.server_dir / name).stat().st_mode) == 0o600


# -- robustness ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.server
def test_training_goes_on_through_a_database_restart_and_the_run_is_complete(team, tmp_path):
    env = team.env("alice", experiment="team-restart")
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "taskcodec"), "train", *TINY, "--max-steps", "40",
                                 "--log-every", "1"], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def first_metrics():
            assert proc.poll() is None, log.read_text()
            return team.sql("SELECT r.run_uuid FROM runs r JOIN experiments e USING (experiment_id) "
                            "JOIN metrics m USING (run_uuid) WHERE e.name = 'team-restart' "
                            "AND m.key = 'loss' LIMIT 1")

        ((run_id,),) = wait_for(first_metrics, "the first logged step", timeout=180)
        # Freeze the trainer while the database goes down, so that the outage surely falls
        # inside the run, however fast this machine trains.
        proc.send_signal(signal.SIGSTOP)
        sent_before = len(team.steps(run_id, "loss"))
        stopped = run_script(SCRIPTS / "postgres-test-server", "stop", "--dir", team.pg_dir,
                             env=dict(os.environ))
        proc.send_signal(signal.SIGCONT)
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(3)  # training goes on; logging fails and retries
        started = run_script(SCRIPTS / "postgres-test-server", "start", "--dir", team.pg_dir,
                             env=dict(os.environ))
        assert started.returncode == 0, started.stderr
        assert proc.wait(timeout=240) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    team.outputs.append(output)
    assert sent_before < 40
    assert "MLflow logging failed" in output and "tracking server reachable again" in output
    assert team.steps(run_id, "loss") == list(range(1, 41))
    assert team.sql("SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    keys = [o["Key"] for o in team.s3().list_objects_v2(Bucket=team.bucket)["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/checkpoints/last.pt") for k in keys)


# -- doctor ----------------------------------------------------------------------------------
def doctor(env: dict[str, str], *args: str):
    from click.testing import CliRunner

    from taskcodec.cli.main import cli

    clean = {k: None for k in os.environ if k.startswith(("MLFLOW_TRACKING_", "AWS_"))}
    return CliRunner().invoke(cli, ["doctor", *args], env={**clean, **env})


@pytest.mark.slow
@pytest.mark.server
def test_doctor_passes_on_the_team_server_and_cleans_up(team):
    env = team.env("alice", experiment="team-doctor")
    result = doctor(env, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        ("server", "ok"), ("credentials", "ok"), ("experiment", "ok"), ("artifacts", "ok")]
    assert "user 'alice' accepted" in report["checks"][1]["detail"]
    assert "through the server" in report["checks"][3]["detail"]
    assert team.passwords["alice"] not in result.output
    runs = team.sql("SELECT r.lifecycle_stage FROM runs r JOIN experiments e USING (experiment_id) "
                    "WHERE e.name = 'team-doctor'")
    assert runs == [("deleted",)]  # its throwaway run
    keys = [o["Key"] for o in team.s3().list_objects_v2(Bucket=team.bucket)["Contents"]]
    assert not [k for k in keys if "/doctor/" in k]  # and its test file are gone


@pytest.mark.slow
@pytest.mark.server
def test_doctor_names_a_wrong_password_with_its_fix(team):
    env = team.env("alice", experiment="team-doctor", password="wrong-password-123")
    result = doctor(env)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"FAIL credentials  tracking server {team.uri} refused the login of user 'alice' " \
           "(HTTP 401); fix: check MLFLOW_TRACKING_PASSWORD" in "\n".join(lines)
    assert [line.split()[0] for line in lines[1:5]] == ["ok", "FAIL", "skip", "skip"]
    assert "wrong-password-123" not in result.output


@pytest.mark.slow
@pytest.mark.server
def test_doctor_names_a_server_that_does_not_answer(team):
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**team.env("alice", experiment="team-doctor"), "MLFLOW_TRACKING_URI": uri}
    result = doctor(env, "--json")
    assert result.exit_code == 1
    server = json.loads(result.stdout)["checks"][0]
    assert server["status"] == "fail"
    assert server["detail"].startswith(f"cannot reach the MLflow tracking server {uri}: ")
    assert "make tracking-server" in server["fix"]


# -- without the stack: settings, make targets, manifests, credentials ------------------------
def test_doctor_on_a_local_store_round_trips_an_artifact_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = doctor({"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "laptop"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1] == f"ok   server       local store {uri}: no server needed"
    assert lines[2] == "skip credentials  a local store needs no login"
    assert lines[3] == "ok   experiment   'laptop' did not exist; created it (id 1), as the first run would"
    assert lines[4].startswith("ok   artifacts    64 bytes uploaded and downloaded in the local folder")
    assert lines[-1] == "all checks passed"
    assert not list(tmp_path.glob("mlruns/1/*/artifacts/doctor/*"))  # the test file is gone


def test_doctor_names_a_deleted_experiment_and_how_to_restore_it(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    result = doctor({"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "gone"}, "--json")
    assert result.exit_code == 1
    checks = json.loads(result.stdout)["checks"]
    assert (checks[2]["status"], checks[2]["detail"]) == ("fail", "experiment 'gone' (id 1) is deleted")
    assert checks[2]["fix"].startswith("restore it (mlflow experiments restore --experiment-id 1)")
    assert checks[3] == {"name": "artifacts", "status": "skip", "detail": "no usable experiment",
                         "fix": ""}


@pytest.mark.parametrize(("unset", "message"), [
    ("TASKCODEC_BACKEND_STORE_URI", "TASKCODEC_BACKEND_STORE_URI is not set: it must hold the "
                                    "backend store URI"),
    ("TASKCODEC_ARTIFACTS_DESTINATION", "TASKCODEC_ARTIFACTS_DESTINATION is not set: it must hold "
                                        "the artifact location"),
])
def test_tracking_server_refuses_to_start_without_its_settings(tmp_path, unset, message):
    env = {**os.environ, "TASKCODEC_BACKEND_STORE_URI": "postgresql://u@127.0.0.1:1/db",
           "TASKCODEC_ARTIFACTS_DESTINATION": "s3://bucket/artifacts"}
    del env[unset]
    result = run_script(SCRIPTS / "tracking-server", "start", "--dir", tmp_path / "s", env=env,
                        timeout=30)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"tracking-server: error: {message}")
    assert not (tmp_path / "s").exists()


def test_tracking_server_refuses_an_unknown_default_permission(tmp_path):
    env = {**os.environ, "TASKCODEC_BACKEND_STORE_URI": "postgresql://u@127.0.0.1:1/db",
           "TASKCODEC_ARTIFACTS_DESTINATION": "s3://bucket/artifacts",
           "TASKCODEC_AUTH_DEFAULT_PERMISSION": "ALL"}
    result = run_script(SCRIPTS / "tracking-server", "start", "--dir", tmp_path / "s", env=env,
                        timeout=30)
    assert (result.returncode, result.stderr) == (
        1, "tracking-server: error: TASKCODEC_AUTH_DEFAULT_PERMISSION='ALL' is not one of READ, "
           "NO_PERMISSIONS, USE, EDIT, MANAGE\n")


def test_make_targets_call_the_script_on_loopback(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text(f"install:\n\ninclude {ROOT / 'deploy' / 'tracking.mk'}\n")
    result = subprocess.run(["make", "-n", "-f", str(makefile), "-C", str(ROOT), "tracking-server",
                             "tracking-server-stop", "TRACKING_DIR=/srv/t",
                             "TRACKING_ALLOWED_HOSTS=mlflow.lab.example"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    commands = " ".join(result.stdout.replace("\\\n", " ").split())
    assert ('scripts/tracking-server start --dir "/srv/t" --host "127.0.0.1" --port "5000" '
            '--workers "2" --allowed-hosts "mlflow.lab.example"') in commands
    assert 'scripts/tracking-server stop --dir "/srv/t"' in commands


def k8s_resources() -> list[Path]:
    folder = ROOT / "deploy" / "k8s"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [folder / name for name in kustomization["resources"]]


def test_manifests_pass_strict_schema_validation():
    files = k8s_resources()
    kinds = {yaml.safe_load(f.read_text())["kind"] for f in files}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", *map(str, files)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files)


def test_manifests_take_every_secret_from_secret_refs_and_probe_health():
    docs = {yaml.safe_load(f.read_text())["kind"]: yaml.safe_load(f.read_text())
            for f in k8s_resources()}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    for name in ("PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    for entry in container["env"]:
        if re.search(r"PASSWORD|SECRET|TOKEN|KEY_ID", entry["name"]):
            assert "value" not in entry, entry["name"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "--app-name=basic-auth" in container["args"]
    config = docs["ConfigMap"]["data"]
    assert urlsplit(config["backend-store-uri"]).password is None
    assert re.search(r"^database_uri = postgresql\+psycopg2://mlflow@", config["basic_auth.ini"],
                     re.M)
    service = docs["Service"]["spec"]
    assert service["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_client_credentials_follow_mlflows_precedence_and_print_no_secret():
    both = credentials_from_env({"MLFLOW_TRACKING_USERNAME": "alice",
                                 "MLFLOW_TRACKING_PASSWORD": "s3cret-pass",
                                 "MLFLOW_TRACKING_TOKEN": "tok-123"})
    assert both.headers == {"Authorization": "Basic YWxpY2U6czNjcmV0LXBhc3M="}  # alice:s3cret-pass
    assert both.who == "user 'alice'"
    token = credentials_from_env({"MLFLOW_TRACKING_TOKEN": "tok-123"})
    assert token.headers == {"Authorization": "Bearer tok-123"} and "tok-123" not in token.who
    half = credentials_from_env({"MLFLOW_TRACKING_USERNAME": "alice"})
    assert half.headers == {} and half.who == "user 'alice' without a password"
    assert credentials_from_env({}).who == "no credentials"


def test_logger_batches_metrics_that_come_within_its_interval_and_flush_cuts_the_wait(tmp_path):
    """RunLogger sends metrics at most once per interval, what came meanwhile in one call
    (fewer transactions and less GIL time taken from training), and loses none of them."""
    from mlflow.tracking import MlflowClient

    from taskcodec.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'batch.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("batching")).info.run_id
    logger = RunLogger(run_id, uri=uri, metrics_interval=3600.0)
    calls = []
    send = logger.client.log_batch
    logger.client.log_batch = lambda *a, **kw: (calls.append(kw), send(*a, **kw))[1]
    logger.log_metrics({"loss": 1.0}, step=1)  # the first goes out at once
    assert logger.flush(timeout=30)
    for step in range(2, 7):
        logger.log_metrics({"loss": float(step), "bpp": step / 10}, step=step)
    assert logger.flush(timeout=30)  # without flush cutting it short, this waits an hour
    assert logger.close() == []
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert len(client.get_metric_history(run_id, "bpp")) == 5
    assert [len(c["metrics"]) for c in calls] == [1, 10]  # steps 2-6 in one call


def test_logger_sends_other_calls_in_order_between_metric_batches(tmp_path):
    from mlflow.tracking import MlflowClient

    from taskcodec.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'order.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("order")).info.run_id
    logger = RunLogger(run_id, uri=uri, metrics_interval=3600.0)
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_metrics({"loss": 2.0}, step=2)
    logger.set_tags({"phase": "after-2"})
    logger.log_metrics({"loss": 3.0}, step=3)
    assert logger.close() == []  # close sends at once, interval or not
    run = client.get_run(run_id)
    assert run.data.tags["phase"] == "after-2"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]


def test_metrics_interval_comes_from_the_environment_and_bad_values_are_one_line(monkeypatch):
    from taskcodec.errors import TrackingError
    from taskcodec.tracking import metrics_interval_from_env

    monkeypatch.delenv("TASKCODEC_METRICS_INTERVAL", raising=False)
    assert metrics_interval_from_env() == 2.0
    monkeypatch.setenv("TASKCODEC_METRICS_INTERVAL", "0")
    assert metrics_interval_from_env() == 0.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("TASKCODEC_METRICS_INTERVAL", bad)
        with pytest.raises(TrackingError, match=f"TASKCODEC_METRICS_INTERVAL='{bad}'"):
            metrics_interval_from_env()


def test_a_bad_metrics_interval_is_refused_before_a_run_is_created(monkeypatch):
    from mlflow.tracking import MlflowClient

    from taskcodec.config import TrainConfig
    from taskcodec.engine import train
    from taskcodec.errors import TrackingError

    monkeypatch.setenv("TASKCODEC_METRICS_INTERVAL", "often")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "bad-interval")
    with pytest.raises(TrackingError, match="TASKCODEC_METRICS_INTERVAL='often'"):
        train(TrainConfig.from_dict({"N": 8, "M": 8, "patch_size": 32, "batch_size": 2,
                                     "max_steps": 1, "max_val_images": 1, "max_side": 128}))
    client = MlflowClient()
    experiment = client.get_experiment_by_name("bad-interval")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
