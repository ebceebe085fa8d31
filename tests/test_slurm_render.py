"""The sbatch script slurm-launch renders: golden files, shell safety, signal forwarding and
requeue, validation, squeue parsing, SSH quoting and the defaults files.

The rendered script is executed here with bash, outside Slurm, against stand-ins on PATH: a fake
``mlflow`` that records its argv and environment, and fake ``scontrol``/``sbatch`` that record
theirs. That runs the script's real logic (array index -> parameters and run id, environment,
checkpoint folder, signal forwarding, requeue) without a cluster; tests/test_slurm_cluster.py
does the same against a real Slurm. Regenerate the golden files with
``TASKCODEC_REGEN_GOLDEN=1 pytest tests/test_slurm_render.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from taskcodec.cli import slurm as cli
from taskcodec.errors import ConfigError
from taskcodec.launch import slurm
from taskcodec.launch.spec import JobSpec

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("TASKCODEC_REGEN_GOLDEN") == "1"
URI = "http://mlflow.example.org:5000"

GOLDEN_CASES = {
    "slurm_cpu.sh": [
        "train", "-P", "lmbda=0.0130", "-P", "epochs=10", "--name", "rd-cpu",
        "--account", "def-lab", "--partition", "cpu", "--time", "2:00:00", "--cpus", "4",
        "--mem", "8G", "--venv", "/home/me/taskcodec/.venv", "--project-dir", "/home/me/taskcodec",
        "--output-dir", "/scratch/me/logs"],
    "slurm_multigpu_container.sh": [
        "train", "-P", "codec=mbt2018-mean", "-P", "lmbda=0.0067", "-P",
        "data=/project/data/clic.tar", "--stage-data", "--gpus", "a100:2", "--cpus", "8",
        "--mem", "32G", "--time", "1-00:00:00", "--image", "/project/images/taskcodec.sif",
        "--bind", "/project/data", "--pass-env", "WANDB_MODE", "-e", "TORCH_HOME=/tmp/torch",
        "--setup", "module load apptainer", "--output-dir", "/scratch/me/logs",
        "--signal-grace", "600", "--mail-type", "END,FAIL", "--mail-user", "me@example.org",
        "--experiment", "rd-a100"],
    "slurm_sweep.sh": [
        "train", "--sweep", "lmbda=0.0018,0.0067", "--sweep",
        "codec=bmshj2018-factorized,mbt2018-mean", "-P", "epochs=100", "--gpus", "1",
        "--max-parallel", "2", "--depends-on", "1234", "--venv", "/home/me/.venv",
        "--project-dir", "/home/me/taskcodec", "--output-dir", "/scratch/me/logs",
        "--experiment", "rd-sweep", "--time", "12:00:00"],
}


@pytest.fixture
def clean_cwd(tmp_path, monkeypatch):
    """No defaults files of the developer: an empty config home and an empty working dir."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TASKCODEC_SLURM_CONFIG", raising=False)
    monkeypatch.delenv("TASKCODEC_SLURM_HOST", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def run_cli(command, args, env=None):
    return CliRunner().invoke(command, args, env=env, catch_exceptions=False)


# -- golden files -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_dry_run_prints_exactly_the_golden_script(name, clean_cwd):
    result = run_cli(cli.launch, [*GOLDEN_CASES[name], "--dry-run"],
                     env={"MLFLOW_TRACKING_URI": URI, "MLFLOW_EXPERIMENT_NAME": None,
                          "WANDB_MODE": "offline"})  # --pass-env needs it set here
    assert result.exit_code == 0, result.stderr
    assert "nothing submitted" in result.stderr
    path = GOLDEN / name
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(result.stdout)
    assert result.stdout == path.read_text(), f"rendered script differs from {path}"


def test_golden_scripts_are_valid_bash():
    for name in GOLDEN_CASES:
        done = subprocess.run(["bash", "-n", str(GOLDEN / name)], capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {done.stderr}"


def test_sbatch_flags_sorted_and_quoted():
    spec = JobSpec("train", name="x", time="1:00:00", memory="4G", gpus=2, gpu_type="a100")
    options = slurm.SlurmOptions(output_dir="/out dir/logs", account="def-me")
    lines = [l for l in slurm.render_sbatch(spec, options).splitlines() if l.startswith("#SBATCH")]
    keys = [l.split("=")[0] for l in lines]
    assert keys == sorted(keys)
    assert "#SBATCH --output='/out dir/logs/%x-%A_%a.out'" in lines
    assert "#SBATCH --gres=gpu:a100:2" in lines
    assert "#SBATCH --signal=B:USR1@300" in lines and "#SBATCH --requeue" in lines


def test_dry_run_creates_no_mlflow_run_and_leaks_no_secret(clean_cwd, tmp_path):
    db = tmp_path / "runs.db"
    result = run_cli(cli.launch, ["train", "--sweep", "lmbda=0.01,0.02", "--dry-run"],
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}",
                          "MLFLOW_TRACKING_PASSWORD": "s3cret-pw", "MLFLOW_TRACKING_TOKEN": "tok-42"})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash\n")
    assert "s3cret-pw" not in result.output and "tok-42" not in result.output
    assert not db.exists(), "a dry run must not touch the tracking store"


# -- running the rendered script with bash (outside Slurm) --------------------------------------
FAKE_MLFLOW = """\
#!{python}
# Stand-in for mlflow: records argv and environment; "training" mode behaves like mlflow run
# around a training process that checkpoints on SIGUSR1/SIGTERM and exits 75.
import json, os, signal, subprocess, sys, time
record = os.environ["FAKE_RECORD"]
rank = os.environ.get("RANK", "0")
with open(f"{{record}}.{{rank}}.json", "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ),
               "usr1": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
               "term": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN}}, f)
if os.environ.get("FAKE_TRAIN"):
    child = subprocess.Popen([sys.executable, "-c", '''
import os, signal, sys, time
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
open(os.environ["FAKE_RECORD"] + ".ready", "w").close()
deadline = time.time() + 20
while not got and time.time() < deadline:
    time.sleep(0.02)
open(os.environ["FAKE_RECORD"] + ".train", "w").write(",".join(got))
sys.exit(75 if got else 0)
'''])
    code = child.wait()
    open(record + ".mlflow", "w").write(str(code))
    sys.exit(1 if code else 0)  # mlflow run reports any failure as 1
"""

RECORDER = """\
#!/bin/sh
printf '%s\\n' "$0 $*" >> "$FAKE_RECORD.calls"
"""


@pytest.fixture
def fakes(tmp_path):
    """A bin folder with fake mlflow, scontrol and sbatch, and the record path they write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text(FAKE_MLFLOW.format(python=sys.executable))
    for name in ("scontrol", "sbatch"):
        (bin_dir / name).write_text(RECORDER)
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir, tmp_path / "record"


def run_script(script: str, tmp_path: Path, fakes, task: int = 0, run_ids: str = "r0 r1",
               extra_env: dict | None = None, wait: bool = True):
    """Run the script like Slurm would (as array task ``task``); a CompletedProcess, or the
    Popen when ``wait`` is False."""
    bin_dir, record = fakes
    path = tmp_path / "job.sh"
    path.write_text(script)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "4242", "TASKCODEC_RUN_IDS": run_ids,
           "FAKE_RECORD": str(record), **(extra_env or {})}
    # Its own session: the script forwards signals to its process group, never to pytest's.
    proc = subprocess.Popen(["bash", str(path)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def recorded(fakes, rank: int = 0) -> dict:
    return json.loads(Path(f"{fakes[1]}.{rank}.json").read_text())


INJECTIONS = ["$(touch {pwned})", "; rm -rf ~", "`touch {pwned}`", "a b\n'\"c"]


@pytest.mark.parametrize("task", [0, 1])
def test_injected_values_reach_the_program_literally(tmp_path, fakes, task):
    pwned = tmp_path / "pwned"
    values = [v.format(pwned=pwned) for v in INJECTIONS]
    spec = JobSpec("train", params={"data": values[1], "run_name": values[2]},
                   sweep={"codec": [values[0], values[3]]}, tracking_uri=URI,
                   env={"FOO": values[0]}, experiment="exp; rm -rf ~")
    options = slurm.SlurmOptions(output_dir="/tmp/logs", checkpoint_dir=str(tmp_path / "c$(x)"))
    script = slurm.render_sbatch(spec, options, project_dir="/proj $(touch x)")
    sentinel = tmp_path / "home" / "keep-me"
    sentinel.parent.mkdir()
    sentinel.write_text("still here")

    proc = run_script(script, tmp_path, fakes, task=task)

    assert proc.returncode == 0, proc.stderr
    seen = recorded(fakes)
    run_id = ["r0", "r1"][task]
    ckpt = f"{tmp_path}/c$(x)/{run_id}"
    assert seen["argv"] == [
        "run", "/proj $(touch x)", "-e", "train", "--env-manager", "local", "--experiment-name",
        "exp; rm -rf ~", "-P", f"codec={values[0] if task == 0 else values[3]}",
        "-P", f"data={values[1]}", "-P", f"run_name={values[2]}", "--run-id", run_id,
        "-P", f"checkpoint_dir={ckpt}"]
    assert seen["env"]["FOO"] == values[0]
    assert seen["env"]["MLFLOW_TRACKING_URI"] == URI
    assert seen["env"]["MLFLOW_EXPERIMENT_NAME"] == "exp; rm -rf ~"
    assert not pwned.exists() and not (tmp_path / "x").exists()
    assert sentinel.read_text() == "still here"
    assert Path(ckpt).is_dir()


def test_script_without_run_ids_lets_mlflow_create_a_run(tmp_path, fakes):
    script = slurm.render_sbatch(JobSpec("train", tracking_uri=URI), slurm.SlurmOptions())
    proc = run_script(script, tmp_path, fakes, run_ids="")
    assert proc.returncode == 0
    assert "--run-id" not in recorded(fakes)["argv"]
    assert "mlflow creates a new run" in proc.stderr


def test_unknown_array_index_fails_clearly(tmp_path, fakes):
    script = slurm.render_sbatch(JobSpec("train", tracking_uri=URI), slurm.SlurmOptions())
    proc = run_script(script, tmp_path, fakes, task=3)
    assert proc.returncode == 2
    assert "array task 3 has no parameters" in proc.stderr
    assert not Path(f"{fakes[1]}.0.json").exists()


def test_credentials_file_is_read_not_rendered(tmp_path, fakes):
    creds = tmp_path / "creds.env"
    creds.write_text("MLFLOW_TRACKING_TOKEN='tok en$(x)'\n")
    creds.chmod(0o600)
    script = slurm.render_sbatch(JobSpec("train", tracking_uri=URI), slurm.SlurmOptions())
    assert "tok en" not in script
    proc = run_script(script, tmp_path, fakes, extra_env={"TASKCODEC_CREDENTIALS_FILE": str(creds)})
    assert proc.returncode == 0, proc.stderr
    assert recorded(fakes)["env"]["MLFLOW_TRACKING_TOKEN"] == "tok en$(x)"


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_signal_reaches_training_and_usr1_requeues(tmp_path, fakes, sig, requeued):
    """Slurm's --signal=B:USR1 goes to the batch shell only: it must reach the training process
    (through an mlflow that ignores it) and, once training exited, requeue the job."""
    script = slurm.render_sbatch(JobSpec("train", tracking_uri=URI), slurm.SlurmOptions())
    record = fakes[1]
    proc = run_script(script, tmp_path, fakes, extra_env={"FAKE_TRAIN": "1"}, wait=False)
    wait_for(Path(f"{record}.ready"))
    proc.send_signal(sig)  # to the batch shell only, as Slurm's B: does
    out, err = proc.communicate(timeout=30)

    assert Path(f"{record}.train").read_text() == sig.name
    assert Path(f"{record}.mlflow").read_text() == "75", "mlflow must wait for training, not die"
    calls = Path(f"{record}.calls").read_text() if Path(f"{record}.calls").exists() else ""
    if requeued:
        assert calls.split("\n")[0].endswith("scontrol requeue 4242")
        assert proc.returncode == 0
    else:
        assert calls == ""
        assert proc.returncode == 1
    assert recorded(fakes)["usr1"] is True  # the wrapper (mlflow) ignores it


def test_requeue_refused_resubmits_the_task(tmp_path, fakes):
    bin_dir, record = fakes
    (bin_dir / "scontrol").write_text(RECORDER + "exit 1\n")
    spec = JobSpec("train", sweep={"lmbda": ["0.1", "0.2"]}, tracking_uri=URI)
    script = slurm.render_sbatch(spec, slurm.SlurmOptions())
    proc = run_script(script, tmp_path, fakes, task=1, extra_env={"FAKE_TRAIN": "1"}, wait=False)
    wait_for(Path(f"{record}.ready"))
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=30)
    calls = Path(f"{record}.calls").read_text().splitlines()
    assert calls[0].endswith("scontrol requeue 4242")
    assert calls[1].endswith(f"sbatch --array=1 {tmp_path / 'job.sh'}")
    assert recorded(fakes)["argv"][-3:] == ["lmbda=0.2", "--run-id", "r1"]


def test_finished_training_is_not_requeued(tmp_path, fakes):
    """USR1 arriving as training ends successfully: no requeue."""
    script = slurm.render_sbatch(JobSpec("train", tracking_uri=URI), slurm.SlurmOptions())
    bin_dir, record = fakes
    (bin_dir / "mlflow").write_text("#!/bin/sh\nkill -s USR1 $PPID\nsleep 0.3\nexit 0\n")
    proc = run_script(script, tmp_path, fakes)
    assert proc.returncode == 0
    assert not Path(f"{record}.calls").exists()


@pytest.mark.slow
def test_multi_gpu_runs_one_process_per_gpu_under_torchrun(tmp_path, fakes):
    """gpus=2: torchrun (real) starts two mlflow processes with the rendezvous variables."""
    spec = JobSpec("train", gpus=2, cpus=4, tracking_uri=URI)
    script = slurm.render_sbatch(spec, slurm.SlurmOptions())
    bin_dir = fakes[0]
    (bin_dir / "torchrun").symlink_to(Path(sys.prefix) / "bin" / "torchrun")
    proc = run_script(script, tmp_path, fakes, run_ids="r0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [recorded(fakes, rank)["env"] for rank in (0, 1)]
    assert sorted(e["RANK"] for e in ranks) == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in ranks} == {"2"}
    assert {e["LOCAL_RANK"] for e in ranks} == {"0", "1"}
    assert all(e["MASTER_ADDR"] and e["MASTER_PORT"] for e in ranks)
    assert {e["OMP_NUM_THREADS"] for e in ranks} == {"2"}
    assert all(recorded(fakes, r)["argv"][-2:] == ["--run-id", "r0"] for r in (0, 1))
    assert all(recorded(fakes, r)["term"] is True for r in (0, 1))


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("90", 5400), ("5:30", 330), ("1:30:00", 5400),
                                           ("2-00:00:00", 172800), ("1-12", 129600),
                                           ("1-0:30", 88200), ("UNLIMITED", None)])
def test_parse_time_accepts_slurm_formats(text, seconds):
    assert slurm.parse_time(text) == seconds


@pytest.mark.parametrize("text", ["1h", "1:2:3:4", "-5", "0", "1.5", "", "1-"])
def test_parse_time_refuses_others(text):
    with pytest.raises(ConfigError, match="--time"):
        slurm.parse_time(text)


def test_parse_gpus():
    assert slurm.parse_gpus("2") == ("", 2)
    assert slurm.parse_gpus("a100:4") == ("a100", 4)
    for bad in ("-1", "two", "a 100:2"):
        with pytest.raises(ConfigError, match="--gpus"):
            slurm.parse_gpus(bad)


@pytest.mark.parametrize("spec_kwargs, option_kwargs, message", [
    ({"time": "00:04:00"}, {}, "not shorter than the time limit"),
    ({"memory": "12XB"}, {}, "--memory '12XB'"),
    ({"name": "a b"}, {}, "--name 'a b'"),
    ({}, {"depends_on": "after 12"}, "--depends-on"),
    ({}, {"mail_type": "END,SOMETIMES"}, "--mail-type 'SOMETIMES'"),
    ({}, {"signal_grace": 0}, "--signal-grace 0"),
    ({}, {"stage_data": True}, "--stage-data needs -P data=PATH"),
    ({}, {"output_dir": "logs\nx"}, "control character"),
])
def test_options_validate_refuses(spec_kwargs, option_kwargs, message):
    spec = JobSpec("train", **spec_kwargs)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        slurm.SlurmOptions(**option_kwargs).validate(spec)


def test_dependency_forms():
    assert slurm.SlurmOptions(depends_on="12,34").dependency() == "afterok:12:34"
    assert slurm.SlurmOptions(depends_on="afterany:12_3").dependency() == "afterany:12_3"
    slurm.SlurmOptions(depends_on="afterok:12,singleton").validate(JobSpec("train"))


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown entry point 'nope'"),
    (["train", "-P", "lmbda_typo=1"], "has no parameter 'lmbda_typo'"),
    (["train", "--time", "soon"], "--time 'soon' is not a Slurm time"),
    (["train", "--gpus", "-1"], "--gpus '-1' is out of range"),
    (["train", "--cpus", "0"], "--cpus 0 is out of range"),
    (["train", "--sweep", "lmbda=0.1,"], "has an empty value"),
    (["train", "--host", "-oProxyCommand=x"], "--host"),
])
def test_launch_refuses_bad_input_in_one_line(clean_cwd, args, message):
    result = run_cli(cli.launch, [*args, "--dry-run"], env={"MLFLOW_TRACKING_URI": URI})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_launch_needs_a_tracking_uri(clean_cwd):
    result = run_cli(cli.launch, ["train", "--dry-run"], env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 2 and "no tracking server" in result.stderr


def test_remote_launch_needs_project_dir(clean_cwd):
    result = run_cli(cli.launch, ["train", "--host", "login", "--dry-run"],
                     env={"MLFLOW_TRACKING_URI": URI})
    assert result.exit_code == 2 and "--project-dir is needed with --host" in result.stderr


def test_credentials_file_must_be_private(clean_cwd, tmp_path):
    creds = tmp_path / "creds.env"
    creds.write_text("MLFLOW_TRACKING_TOKEN=x\n")
    creds.chmod(0o644)
    result = run_cli(cli.launch, ["train", "--credentials-file", str(creds), "--dry-run"],
                     env={"MLFLOW_TRACKING_URI": URI})
    assert result.exit_code == 2 and "readable by others (mode 644)" in result.stderr


def test_help_is_fast_and_imports_neither_torch_nor_mlflow():
    code = ("import sys; from taskcodec.cli import slurm; from click.testing import CliRunner; "
            "r = CliRunner().invoke(slurm.launch, ['--help']); assert 'Examples' in r.output; "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert time.monotonic() - start < 10


# -- defaults files -----------------------------------------------------------------------------
def test_defaults_user_then_project_then_cli(clean_cwd, tmp_path):
    user = tmp_path / "config" / "taskcodec" / "slurm.toml"
    user.parent.mkdir(parents=True)
    user.write_text('account = "def-user"\npartition = "gpu"\ntime = "1:00:00"\n'
                    'setup = ["module load python"]\nenv = {A = "1", B = "2"}\n')
    project = clean_cwd / ".taskcodec" / "slurm.toml"
    project.parent.mkdir()
    project.write_text('partition = "cpu"\nenv = {B = "3"}\n')
    result = run_cli(cli.launch, ["train", "--time", "2:00:00", "--dry-run"],
                     env={"MLFLOW_TRACKING_URI": URI})
    assert result.exit_code == 0, result.stderr
    script = result.stdout
    assert "#SBATCH --account=def-user" in script
    assert "#SBATCH --partition=cpu" in script
    assert "#SBATCH --time=2:00:00" in script
    assert "export A=1" in script and "export B=3" in script
    assert "module load python" in script


def test_defaults_unknown_key_is_refused(clean_cwd):
    project = clean_cwd / ".taskcodec" / "slurm.toml"
    project.parent.mkdir()
    project.write_text('acount = "typo"\n')
    result = run_cli(cli.launch, ["train", "--dry-run"], env={"MLFLOW_TRACKING_URI": URI})
    assert result.exit_code == 2
    assert f"{project}: unknown key acount" in result.stderr


# -- squeue parsing and the table ---------------------------------------------------------------
def _squeue_22(comment):
    return {"jobs": [
        {"job_id": 8, "array_job_id": 7, "array_task_id": 1, "name": "rd", "job_state": "RUNNING",
         "start_time": 1000, "nodes": "node1", "state_reason": "None", "comment": comment},
        {"job_id": 7, "array_job_id": 7, "array_task_id": None, "array_task_string": "2-3",
         "name": "rd", "job_state": "PENDING", "start_time": 0, "nodes": "",
         "state_reason": "Resources", "comment": comment},
        {"job_id": 9, "array_job_id": 0, "name": "other", "job_state": "RUNNING", "comment": ""},
    ]}


def test_parse_squeue_maps_tasks_to_runs():
    comment = slurm.make_comment(["r0", "r1", "r2", "r3"], ["", "http://ui/r1", "", ""])
    rows = slurm.parse_squeue(_squeue_22(comment), now=1000 + 3725)
    assert [(r.job_id, r.state, r.elapsed, r.where, r.run_id, r.link) for r in rows] == [
        ("7_1", "RUNNING", "01:02:05", "node1", "r1", "http://ui/r1"),
        ("7_2", "PENDING", "-", "(Resources)", "r2", ""),
        ("7_3", "PENDING", "-", "(Resources)", "r3", "")]
    assert len(slurm.parse_squeue(_squeue_22(comment), all_jobs=True)) == 4
    table = slurm.format_jobs(rows)
    assert table.splitlines()[0].split() == ["JOB", "NAME", "STATE", "ELAPSED", "NODES/REASON",
                                             "MLFLOW", "RUN"]
    assert "http://ui/r1" in table.splitlines()[1]


def test_parse_squeue_newer_slurm_format():
    data = {"jobs": [{"job_id": 8, "array_job_id": {"set": True, "number": 7},
                      "array_task_id": {"set": True, "number": 0}, "name": "rd",
                      "job_state": ["RUNNING"], "start_time": {"set": True, "number": 50},
                      "nodes": "n1", "comment": slurm.make_comment(["r0"], [""])}]}
    (row,) = slurm.parse_squeue(data, now=110)
    assert (row.job_id, row.state, row.elapsed, row.run_id) == ("7_0", "RUNNING", "00:01:00", "r0")


# -- SSH: commands are quoted for the remote shell ----------------------------------------------
def test_ssh_command_survives_the_remote_shell(tmp_path, fakes):
    """What ssh hands to the login node's shell must come out as the same argv there."""
    bin_dir, record = fakes
    cluster = slurm.Cluster("login.example", ["-F", "/dev/null"])
    argv = cluster.argv(["sbatch", "--parsable", "--comment=taskcodec {\"runs\":[\"a b\"]}"],
                        env={"TASKCODEC_RUN_IDS": "r0 r1", "X": "$(touch pwned); rm -rf ~"})
    assert argv[:5] == ["ssh", "-F", "/dev/null", "--", "login.example"]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_RECORD": str(record)}
    (bin_dir / "sbatch").write_text('#!/bin/sh\nprintf "%s\\n" "$TASKCODEC_RUN_IDS" "$X" "$@" '
                                    '> "$FAKE_RECORD.sbatch"\n')
    subprocess.run(["sh", "-c", argv[-1]], env=env, cwd=tmp_path, check=True)  # the remote shell
    assert Path(f"{record}.sbatch").read_text().splitlines() == [
        "r0 r1", "$(touch pwned); rm -rf ~", "--parsable", '--comment=taskcodec {"runs":["a b"]}']
    assert not (tmp_path / "pwned").exists()


def test_cluster_refuses_bad_job_ids():
    cluster = slurm.Cluster()
    for bad in ("12;rm", "-1", "12_x", ""):
        with pytest.raises(ConfigError, match="is not a Slurm job id"):
            cluster.cancel([bad])
        with pytest.raises(ConfigError):
            cluster.log_files(bad)


def test_write_private_makes_a_0600_file(tmp_path):
    path = slurm.Cluster().write_private(str(tmp_path / "d" / "creds.env"), "A=1\n")
    assert Path(path) == tmp_path / "d" / "creds.env"
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    assert Path(path).read_text() == "A=1\n"


def test_shell_helpers_are_posix_sh():
    """The container relay runs under /bin/sh (dash here), not bash."""
    for snippet in (slurm.RELAY, slurm._IGNORE):
        done = subprocess.run(["sh", "-n", "-c", snippet], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_relay_forwards_to_its_group_and_returns_the_status(tmp_path):
    """The in-container relay: a signal to it reaches the training process; its status is
    the child's."""
    marker = tmp_path / "got"
    child = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *a: (open({str(marker)!r}, "w").write("USR1"),
                                                  sys.exit(75)))
        open({str(tmp_path / 'ready')!r}, "w").close()
        time.sleep(20)
    """)
    proc = subprocess.Popen(["sh", "-c", slurm.RELAY, "relay", sys.executable, "-c", child],
                            start_new_session=True)
    wait_for(tmp_path / "ready")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=20) == 75
    assert marker.read_text() == "USR1"


def test_quoting_matches_shlex(tmp_path):
    """Every parameter is one shlex.quote'd word in the case arm of its task."""
    spec = JobSpec("train", params={"run_name": "it's $HOME"}, tracking_uri=URI)
    script = slurm.render_sbatch(spec, slurm.SlurmOptions())
    assert shlex.quote("run_name=it's $HOME") in script


def test_pending_array_record_lists_each_task_with_its_run():
    """Before the scheduler splits an array, squeue shows one record "12_[0-2]"; slurm-status
    still lists every task with its MLflow run (users want the ids at once)."""
    from taskcodec.launch.slurm import make_comment, parse_squeue

    runs = ["a" * 32, "b" * 32, "c" * 32]
    record = {"job_id": 12, "array_job_id": 12, "array_task_id": None,
              "array_task_string": "0-2%2", "job_state": "PENDING", "name": "sweep",
              "state_reason": "Resources", "comment": make_comment(runs, ["l0", "l1", "l2"])}
    rows = parse_squeue({"jobs": [record]}, now=0)
    assert [(r.job_id, r.state, r.run_id, r.where) for r in rows] == [
        ("12_0", "PENDING", runs[0], "(Resources)"), ("12_1", "PENDING", runs[1], "(Resources)"),
        ("12_2", "PENDING", runs[2], "(Resources)")]
    odd = parse_squeue({"jobs": [{**record, "array_task_string": "weird"}]}, now=0)
    assert [r.job_id for r in odd] == ["12_[weird]"]
