"""Rules both launchers share (taskcodec.launch.checks / spec / runs), run against both: the
same refusal for a credential-looking variable, one meaning of --pass-env, the --run-id/--sweep
rule, tracking credentials that would not reach the pods, -P paths outside the mounted volume,
the preemption exit code, the speed switches in the rendered commands (GPU defaults, quoting,
parsed back by taskcodec's own CLI); and the Slurm helpers on finished jobs (fake
squeue/scontrol on PATH).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from taskcodec.cli import k8s as k8s_cli
from taskcodec.cli import slurm as slurm_cli
from taskcodec.launch import k8s, slurm
from taskcodec.launch.checks import is_credential_name
from taskcodec.launch.spec import JobSpec
from taskcodec.signals import PREEMPTED_EXIT

URI = "http://mlflow.example.org:5000"
CREDENTIALS = ["DB_PASSWD", "HF_APIKEY", "AWS_SECRET_ACCESS_KEY", "MY_TOKEN", "GITHUB_PAT",
               "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "SSH_KEY", "DB_PASS", "API_KEY",
               "SLACK_AUTH", "PRIVATEKEY"]
HARMLESS = ["KEYBOARD_LAYOUT", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "COMPASS_DIR",
            "MONKEY_COUNT", "PATHWAY", "AUTHOR_NAME", "PYTHONHASHSEED"]
LAUNCHERS = {"slurm": slurm_cli.launch, "k8s": k8s_cli.launch}


@pytest.fixture
def no_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TASKCODEC_SLURM_CONFIG", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def dry_run(launcher: str, *args: str, env=None):
    return CliRunner().invoke(LAUNCHERS[launcher], ["train", *args, "--dry-run"], env=env)


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def test_the_credential_rule_sorts_names():
    assert [n for n in CREDENTIALS if not is_credential_name(n)] == []
    assert [n for n in HARMLESS if is_credential_name(n)] == []


def test_both_launchers_refuse_credential_names_with_one_message(no_defaults):
    for name in CREDENTIALS:
        errors = {}
        for launcher in LAUNCHERS:
            result = dry_run(launcher, "--env", f"{name}=value-42")
            errors[launcher] = one_error(result)
            assert "value-42" not in result.output
        assert errors["slurm"] == errors["k8s"], name
        assert f"slurm-launch --pass-env {name}" in errors["k8s"]
        assert f"k8s-launch --secret-env {name}=SECRET:KEY" in errors["k8s"]
    for name in HARMLESS:
        for launcher in LAUNCHERS:
            result = dry_run(launcher, "--env", f"{name}=value-42")
            assert result.exit_code == 0, (launcher, name, result.output)
            assert "value-42" in result.stdout


def test_pass_env_means_the_same_in_both(no_defaults):
    for launcher in LAUNCHERS:  # unset here: refused, in the same words
        error = one_error(dry_run(launcher, "--pass-env", "TASKCODEC_UNSET_VAR"))
        assert error == "Error: --pass-env TASKCODEC_UNSET_VAR: not set in your environment"
    env = {"WANDB_MODE": "offline", "DB_PASSWD": "pw-42"}
    slurm_run = dry_run("slurm", "--pass-env", "WANDB_MODE", "--pass-env", "DB_PASSWD",
                        "--image", "x.sif", env=env)
    assert slurm_run.exit_code == 0, slurm_run.output
    # Slurm passes values by name (inherited, or listed for the container), never written.
    assert "pw-42" not in slurm_run.stdout and "offline" not in slurm_run.stdout
    assert "DB_PASSWD" in slurm_run.stdout and "WANDB_MODE" in slurm_run.stdout
    k8s_run = dry_run("k8s", "--pass-env", "WANDB_MODE", env=env)
    assert k8s_run.exit_code == 0, k8s_run.output
    assert "value: offline" in k8s_run.stdout  # the pods get it through the manifest ...
    error = one_error(dry_run("k8s", "--pass-env", "DB_PASSWD", env=env))
    assert "--pass-env DB_PASSWD: looks like a credential" in error  # ... so never a credential


def test_run_id_with_sweep_and_credentials_in_the_uri_are_one_rule(no_defaults):
    for args, message in ((["--run-id", "abc", "--sweep", "lmbda=0.1,0.2"],
                           "--run-id continues one run: it cannot be combined with --sweep"),
                          (["--tracking-uri", "http://me:pw@host:5000"],
                           "the tracking URI holds credentials")):
        errors = {launcher: one_error(dry_run(launcher, *args)) for launcher in LAUNCHERS}
        assert errors["slurm"] == errors["k8s"] and message in errors["k8s"]


def test_k8s_warns_when_tracking_credentials_would_not_reach_the_pods(no_defaults):
    env = {"MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_USERNAME": "me"}
    warned = dry_run("k8s", env=env)
    assert warned.exit_code == 0, warned.output
    assert ("warning: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD set here but not given "
            "to the pods") in warned.stderr
    given = dry_run("k8s", "--secret-env", "MLFLOW_TRACKING_USERNAME=auth:user",
                    "--secret-env", "MLFLOW_TRACKING_PASSWORD=auth:password", env=env)
    assert given.exit_code == 0 and "warning" not in given.stderr
    named = dry_run("k8s", "--pass-env", "MLFLOW_TRACKING_USERNAME",  # not a secret: may be passed
                    "--secret-env", "MLFLOW_TRACKING_PASSWORD=auth:password", env=env)
    assert named.exit_code == 0 and "warning" not in named.stderr, named.stderr
    assert "warning" not in dry_run("k8s").stderr  # nothing set here: nothing to say


def test_k8s_dry_run_warns_of_a_data_path_outside_the_mounted_volume(no_defaults):
    # The README's Cityscapes example as it was: the claim is mounted at /mnt/taskcodec.
    wrong = dry_run("k8s", "-P", "data=cityscapes:/mnt/datasets/cityscapes",
                    "--volume-claim", "datasets")
    assert wrong.exit_code == 0, wrong.output
    assert ("/mnt/datasets/cityscapes is outside every mounted path (--volume-claim datasets is "
            "mounted at /mnt/taskcodec (--mount-path))") in wrong.stderr
    for args in (["-P", "data=cityscapes:/mnt/datasets/cityscapes", "--mount-path", "/mnt/datasets"],
                 ["-P", "data=cityscapes:/mnt/taskcodec/cityscapes"], ["-P", "data=embedded"]):
        right = dry_run("k8s", "--volume-claim", "datasets", *args)
        assert right.exit_code == 0 and "warning" not in right.stderr, (args, right.stderr)
    swept = dry_run("k8s", "--sweep", "data=/mnt/a,/mnt/taskcodec/b", "--volume-claim", "d")
    assert "/mnt/a is outside" in swept.stderr and "/mnt/taskcodec/b" not in swept.stderr


def test_one_preemption_exit_code_everywhere():
    from taskcodec.launch import checks, mlflow_run

    assert PREEMPTED_EXIT == 75 and mlflow_run.PREEMPTED_EXIT is checks.PREEMPTED_EXIT is \
        slurm.PREEMPTED_EXIT is k8s.PREEMPTED_EXIT is PREEMPTED_EXIT
    job, = k8s.render_jobs(JobSpec("train"), k8s.K8sOptions(), ["r"])
    rule = job["spec"]["podFailurePolicy"]["rules"][1]
    assert rule["onExitCodes"]["values"] == [PREEMPTED_EXIT]


@pytest.mark.server
def test_runs_made_at_launch_carry_params_tags_and_scheduled(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from taskcodec.launch import runs

    uri = mlflow_server.uri  # the session's server: no store of its own to create
    spec = JobSpec("train", params={"epochs": "3"}, sweep={"lmbda": ["0.01", "0.02"]},
                   experiment=f"launch-{tmp_path.name}", tracking_uri=uri).validate()
    made = runs.create_runs(spec, launcher="k8s", base_name="grid", tags={"image": "i"},
                            task_tags=[{"k8s_completion_index": "0"},
                                       {"k8s_completion_index": "1"}])
    client = MlflowClient(uri)
    for index, run_id in enumerate(made.run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "SCHEDULED"
        assert run.info.run_name == f"grid-{index} lmbda={['0.01', '0.02'][index]}"
        assert run.data.params == {"epochs": "3", "lmbda": ["0.01", "0.02"][index]}
        assert {k: run.data.tags[k] for k in ("launcher", "entry_point", "image", "sweep",
                                              "k8s_completion_index")} == {
            "launcher": "k8s", "entry_point": "train", "image": "i",
            "sweep": f"lmbda={['0.01', '0.02'][index]}", "k8s_completion_index": str(index)}
    runs.discard_runs(spec, made, "job not created: HTTP 409")
    failed = client.get_run(made.run_ids[0])
    assert failed.info.status == "FAILED" and failed.data.tags["launch_error"].endswith("409")
    relaunch = JobSpec("train", params={"lmbda": "0.5"}, tracking_uri=uri,
                       run_id=made.run_ids[1])
    assert runs.relaunch_settings(relaunch) == ({"epochs": "3", "lmbda": "0.5"}, f"launch-{tmp_path.name}")


# -- the speed switches in the rendered commands (issue 16) ---------------------------------------

SWITCHES = {"precision", "tf32", "compile", "channels_last"}
NASTY = "night run; $(touch x) 'quoted' \"too\""  # a -P value the shell must not interpret


def rendered_commands(launcher: str, text: str) -> list[list[str]]:
    """The ``mlflow run`` argv of each job in a dry run's output, split as the shell splits it:
    the ``cmd=(...)`` array of each Slurm array task, the container args of a Job (an Indexed
    Job's: the ``exec`` line of each index)."""
    if launcher == "slurm":
        return [shlex.split(line) for line in re.findall(r"^  \d+\) cmd=\((.*)\) ;;$", text,
                                                         re.MULTILINE)]
    commands = []
    for job in yaml.safe_load_all(text):
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[:2] == ["/bin/sh", "-c"]:
            commands += [shlex.split(line) for line in re.findall(r"^  \d+\) exec (.*) ;;$",
                                                                  args[2], re.MULTILINE)]
        else:
            commands.append(args)
    return commands


def params_of(argv: list[str]) -> dict[str, str]:
    """The ``-P NAME=VALUE`` parameters of an ``mlflow run`` argv."""
    return dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "-P")


def rendered_commands_params(launcher: str, text: str) -> list[dict[str, str]]:
    return [params_of(argv) for argv in rendered_commands(launcher, text)]


def launch_params(launcher: str, *args: str) -> list[dict[str, str]]:
    result = dry_run(launcher, "-P", "lmbda=0.0067", *args)
    assert result.exit_code == 0, result.output
    params = rendered_commands_params(launcher, result.stdout)
    assert params, result.stdout
    return params


def test_gpu_jobs_get_precision_auto_and_tf32_and_the_switch_options_reach_every_command(no_defaults):
    given = {"precision": "fp16", "tf32": "false", "compile": "true", "channels_last": "false"}
    for launcher in LAUNCHERS:
        (cpu,) = launch_params(launcher)
        assert not SWITCHES & set(cpu), launcher  # a CPU job: the trainer's own defaults
        (gpu,) = launch_params(launcher, "--gpus", "1", "-P", f"run_name={NASTY}")
        assert {k: gpu[k] for k in SWITCHES & set(gpu)} == {"precision": "auto", "tf32": "true"}
        assert gpu["run_name"] == NASTY  # quoted: the job gets the value, not its expansion
        (on_cpu,) = launch_params(launcher, "--gpus", "1", "-P", "device=cpu")
        assert not SWITCHES & set(on_cpu), launcher
        # The options win over the GPU values, in every job of a sweep and under torchrun.
        options = launch_params(launcher, "--gpus", "2", "--precision", "fp16", "--no-tf32",
                                "--compile", "true", "--no-channels-last",
                                "--sweep", "M=128,192")
        assert [{k: p[k] for k in SWITCHES} for p in options] == [given, given], launcher
        swept = launch_params(launcher, "--gpus", "1", "--sweep", "precision=fp32,bf16")
        assert [(p["precision"], p["tf32"]) for p in swept] == [("fp32", "true"),
                                                                ("bf16", "true")]
        (cpu_given,) = launch_params(launcher, "--channels-last", "--compile", "false")
        assert {k: cpu_given[k] for k in SWITCHES & set(cpu_given)} == {
            "channels_last": "true", "compile": "false"}


def test_switch_quoting_in_the_slurm_script_and_the_k8s_index_script(no_defaults):
    for launcher in LAUNCHERS:
        result = dry_run(launcher, "--gpus", "1", "--sweep", "lmbda=0.01,0.02",
                         "-P", f"run_name={NASTY}", "--compile", "auto")
        assert result.exit_code == 0, result.output
        # Plain words stay bare, the rest is single-quoted: shlex.quote of each word.
        for word in ("precision=auto", "tf32=true", "compile=auto", f"run_name={NASTY}"):
            assert f"-P {shlex.quote(word)}" in result.stdout, (launcher, word)
        assert [p["run_name"] for p in rendered_commands_params(launcher, result.stdout)] == [
            NASTY, NASTY]


def test_a_switch_set_twice_is_one_error_and_only_training_takes_them(no_defaults):
    for launcher in LAUNCHERS:
        error = one_error(dry_run(launcher, "--precision", "bf16", "-P", "precision=fp32"))
        assert error == ("Error: --precision bf16 and -P precision=fp32 both set precision: "
                         "give it once")
        error = one_error(dry_run(launcher, "--no-channels-last", "--sweep",
                                  "channels_last=true,false"))
        assert error == "Error: channels_last given both with -P and --sweep"
        evaluate = ["evaluate", "-P", "checkpoint=abc", "--dry-run"]
        refused = CliRunner().invoke(LAUNCHERS[launcher], [*evaluate, "--precision", "bf16"])
        assert "-P precision: entry point 'evaluate' has no parameter 'precision'" in \
            one_error(refused)
        on_gpu = CliRunner().invoke(LAUNCHERS[launcher], [*evaluate, "--gpus", "1"])
        assert on_gpu.exit_code == 0, on_gpu.output
        assert not SWITCHES & set(rendered_commands_params(launcher, on_gpu.stdout)[0])


def test_rendered_commands_parse_back_into_the_config_the_launch_asked_for(no_defaults, tmp_path):
    """The training command a job runs, made as the job makes it (mlflow's substitution of the
    parameters into MLProject's command, then the shell's word splitting) and parsed by
    taskcodec's own CLI, in this process: the config of the launch's settings."""
    from mlflow.projects._project_spec import load_project

    from taskcodec.cli.main import train
    from taskcodec.cli.options import build_config
    from taskcodec.config import TrainConfig
    from taskcodec.launch.spec import PROJECT_DIR

    entry = load_project(str(PROJECT_DIR)).get_entry_point("train")

    def parsed(argv: list[str]) -> TrainConfig:
        words = shlex.split(entry.compute_command(params_of(argv), str(tmp_path)))
        assert words[:4] == ["python", "-m", "taskcodec.cli.main", "train"], words
        return build_config(TrainConfig, train.make_context("train", words[4:]).params)

    cases = {
        (): {},
        ("--gpus", "1"): {"precision": "auto", "tf32": True},
        ("--gpus", "1", "--precision", "fp16", "--no-tf32", "--compile", "false",
         "--no-channels-last"): {"precision": "fp16", "tf32": False, "compile": "false",
                                 "channels_last": False},
        ("--compile", "true", "-P", "recipe=short-cpu"): {"compile": "true",
                                                          "recipe": "short-cpu"},
    }
    for launcher in LAUNCHERS:
        for args, settings in cases.items():
            result = dry_run(launcher, "-P", "lmbda=0.0067", "-P", f"run_name={NASTY}", *args)
            assert result.exit_code == 0, result.output
            (argv,) = rendered_commands(launcher, result.stdout)
            expected = TrainConfig.from_dict({"lmbda": 0.0067, "run_name": NASTY, **settings})
            assert parsed(argv) == expected, (launcher, args)


# -- the Slurm helpers on finished jobs (issue 19, item 9) ----------------------------------------

def test_status_shows_run_time_and_node_of_a_completed_task():
    from taskcodec.launch.slurm import make_comment, parse_squeue

    record = {"job_id": 13, "array_job_id": 12, "array_task_id": 1, "name": "train",
              "comment": make_comment(["r0", "r1"], ["", ""]), "job_state": ["COMPLETED"],
              "start_time": {"set": True, "number": 1000}, "end_time": {"set": True,
                                                                      "number": 1000 + 3725},
              "nodes": "node7", "state_reason": "None"}
    (row,) = parse_squeue({"jobs": [record]}, now=99999)
    assert (row.job_id, row.state, row.elapsed, row.where, row.run_id) == (
        "12_1", "COMPLETED", "01:02:05", "node7", "r1")
    pending = {**record, "job_state": ["PENDING"], "state_reason": "Priority", "end_time": 0}
    (row,) = parse_squeue({"jobs": [pending]}, now=99999)
    assert (row.elapsed, row.where) == ("-", "(Priority)")


FAKE = """\
#!/bin/sh
# {name}: a stand-in that records its arguments; the job 77 has finished, 88 still runs.
echo "$0 $*" >> {log}
{body}
"""


@pytest.fixture
def finished_job(tmp_path, monkeypatch):
    """Fake squeue/scontrol/scancel on PATH: job 77 finished (log written), job 88 running."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    out = tmp_path / "slurm-logs" / "train-77_0.out"
    out.parent.mkdir()
    out.write_text("step 1\ndone\n")
    bodies = {
        "squeue": 'case "$*" in *"--jobs 88"*) echo 88;; esac',
        "scontrol": f'case "$*" in *77*) echo "JobId=77 StdOut={out} Partition=x";; esac',
        "scancel": "exit 0",
    }
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(FAKE.format(name=name, log=log, body=body))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return log


def test_log_follow_on_a_finished_task_prints_and_returns(finished_job):
    code = "from taskcodec.cli.slurm import log; log(['77_0', '-f'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # before the fix: tail -F, which never returned
    assert done.returncode == 0, done.stderr
    assert done.stdout == "step 1\ndone\n"


def test_cancel_of_a_finished_job_says_so(finished_job):
    result = CliRunner().invoke(slurm_cli.cancel, ["77", "88", "--yes"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["cancelled 88",
                                          "77 had already finished: nothing to cancel"]
    assert "scancel 88" in finished_job.read_text().replace(f"{finished_job.parent}/bin/", "")
    assert "scancel 77" not in finished_job.read_text().replace(f"{finished_job.parent}/bin/", "")
