"""The validated config objects, and the CLI and MLProject built from them: unknown and
out-of-range settings are refused before any work starts, in one line that names the value
and what is allowed; ``--help`` answers without importing torch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from taskcodec.cli.main import cli
from taskcodec.cli.options import build_config
from taskcodec.config import EvalConfig, TrainConfig
from taskcodec.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TASKCODEC = str(Path(sys.executable).parent / "taskcodec")


# --- the config objects ----------------------------------------------------------------------


def test_defaults_are_valid_and_survive_a_round_trip_through_mlflow_params():
    config = TrainConfig.from_dict({})
    assert (config.codec, config.N, config.M, config.lmbda) == ("bmshj2018-factorized", 128, 192,
                                                                0.013)
    params = config.to_params()
    assert all(isinstance(v, str) for v in params.values())
    assert set(params) == {f.name for f in TrainConfig.fields()}
    assert TrainConfig.from_dict(params) == config


def test_unknown_keys_are_named_with_the_known_ones():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"lmbada": 0.1, "lmbda": 0.1})
    message = str(err.value)
    assert message.startswith("unknown train setting lmbada (known: ")
    assert "lmbda" in message.split("known:")[1] and "\n" not in message
    with pytest.raises(ConfigError, match=r"^unknown evaluate settings bogus, lmbda \(known: "):
        EvalConfig.from_dict({"checkpoint": "x.pt", "lmbda": 0.1, "bogus": 1})


@pytest.mark.parametrize(("values", "message"), [
    ({"lmbda": 0}, "lmbda=0.0 is out of range: must be > 0 and <= 10000.0"),
    ({"lmbda": -1}, "lmbda=-1.0 is out of range: must be > 0 and <= 10000.0"),
    ({"lmbda": 2e4}, "lmbda=20000.0 is out of range: must be <= 10000.0"),
    ({"N": 0}, "N=0 is out of range: must be >= 1 and <= 1024"),
    ({"batch_size": 5000}, "batch_size=5000 is out of range: must be <= 4096"),
    ({"lr": 0}, "lr=0.0 is out of range: must be > 0 and <= 1.0"),
    ({"patch_size": 40}, "patch_size=40 must be a multiple of 16 (the codecs downsample by 16)"),
    ({"patch_size": 96, "codec": "mbt2018-mean"},
     "patch_size=96 must be a multiple of 64 for codec=mbt2018-mean (its hyperprior "
     "downsamples by 64)"),
    ({"codec": "jpeg"}, "codec='jpeg' is not one of: bmshj2018-factorized, "
                        "bmshj2018-factorized-relu, bmshj2018-hyperprior, mbt2018-mean, mbt2018, "
                        "cheng2020-anchor, cheng2020-attn, bmshj2018-hyperprior-vbr, "
                        "mbt2018-mean-vbr, mbt2018-vbr"),
    ({"metric": "ssim"}, "metric='ssim' is not one of: mse, ms-ssim"),
    ({"monitor": "val_mAP"}, "monitor='val_mAP' is not one of: val_loss, val_bpp, val_psnr, "
                             "val_ms_ssim"),
    ({"N": "12.5"}, "N='12.5' is not an integer"),
    ({"N": "many"}, "N='many' is not an integer"),
    ({"lmbda": "nan"}, "lmbda='nan' is not a finite number"),
    ({"skip_bad": "maybe"}, "skip_bad='maybe' is not a boolean (use true or false)"),
])
def test_bad_values_are_refused_with_the_value_and_what_is_allowed(values, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)  # bad arguments are ValueErrors


def test_strings_from_the_command_line_and_mlflow_are_coerced():
    config = TrainConfig.from_dict({"N": "128.0", "M": "64", "lmbda": "0.0067", "skip_bad": "true",
                                    "epochs": 3.0, "max_steps": " 7 "})
    assert (config.N, config.M, config.lmbda, config.skip_bad, config.epochs, config.max_steps) \
        == (128, 64, 0.0067, True, 3, 7)
    assert type(config.N) is int and type(config.epochs) is int
    for text, value in (("false", False), ("0", False), ("Yes", True), ("ON", True)):
        assert TrainConfig.from_dict({"skip_bad": text}).skip_bad is value
    assert EvalConfig.from_dict({"checkpoint": "a.pt", "jpeg": "False"}).jpeg is False


def test_validate_also_checks_a_config_changed_after_construction():
    config = TrainConfig.from_dict({})
    config.patch_size = 100
    with pytest.raises(ConfigError, match="patch_size=100 must be a multiple of 16"):
        config.validate()


def test_evaluate_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="^checkpoint is required: an MLflow run id or a "
                                          "checkpoint path$"):
        EvalConfig.from_dict({})


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_refuses_a_bad_value_in_one_line_without_traceback(tmp_path):
    result = subprocess.run([TASKCODEC, "train", "--lmbda", "-1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == "Error: lmbda=-1.0 is out of range: must be > 0 and <= 10000.0\n"
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no store, no checkpoint: nothing was started


def test_validation_happens_before_torch_or_mlflow_are_imported(tmp_path):
    code = ("import sys\n"
            "from taskcodec.cli.main import cli\n"
            "try:\n"
            "    cli(['train', '--patch-size', '40'], prog_name='taskcodec')\n"
            "except SystemExit as exit:\n"
            "    print(exit.code, 'torch' in sys.modules, 'mlflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert result.stderr.splitlines() == [
        "Error: patch_size=40 must be a multiple of 16 (the codecs downsample by 16)"]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--N", "12.5"], "Error: N='12.5' is not an integer"),
    (["train", "--lmbda=-1"], "Error: lmbda=-1.0 is out of range: must be > 0 and <= 10000.0"),
    (["train", "--patch_size", "24"], "Error: patch_size=24 must be a multiple of 16"),
    (["evaluate"], "Error: checkpoint is required"),
    (["evaluate", "--checkpoint", "x.pt", "--max-images", "-2"],
     "Error: max_images=-2 is out of range: must be >= 0"),
])
def test_cli_config_errors_exit_2_with_one_error_line(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_click_choices_are_usage_errors_that_list_the_choices():
    result = CliRunner().invoke(cli, ["train", "--codec", "jpeg"])
    assert result.exit_code == 2
    assert ("Invalid value for '--codec': 'jpeg' is not one of 'bmshj2018-factorized', "
            "'bmshj2018-factorized-relu', 'bmshj2018-hyperprior', 'mbt2018-mean', 'mbt2018', "
            "'cheng2020-anchor', 'cheng2020-attn'") in result.stderr
    result = CliRunner().invoke(cli, ["train", "--lmbada", "1"])
    assert result.exit_code == 2 and "No such option '--lmbada'" in result.stderr


def test_every_command_has_help_with_every_config_option():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name in ("train", "evaluate", "compress", "decompress"):
        assert name in cli.commands
    listed = [line.split()[0] for line in top.output.split("Commands:")[1].splitlines()
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed == sorted(cli.commands)
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"], terminal_width=200)
        assert result.exit_code == 0, (name, result.output)
        assert result.output.startswith(f"Usage: cli {name} ")
    train_help = runner.invoke(cli, ["train", "--help"], terminal_width=200).output
    for f in TrainConfig.fields():
        assert f"--{f.name.replace('_', '-')}" in train_help, f.name
    assert "[default: 0.013]" in train_help


def test_top_level_help_does_not_import_torch():
    code = ("import sys\n"
            "from taskcodec.cli.main import cli\n"
            "try:\n"
            "    cli(['--help'], prog_name='taskcodec')\n"
            "except SystemExit as exit:\n"
            "    code = exit.code\n"
            "print(code, 'torch' in sys.modules, 'mlflow' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stderr.split() == ["0", "False", "False"]
    assert "Usage: taskcodec [OPTIONS] COMMAND" in result.stdout


def test_version():
    from taskcodec import __version__

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"taskcodec, version {__version__}\n"


# --- the MLProject ---------------------------------------------------------------------------


def _rendered(entry_point: str, params: dict) -> list[str]:
    """The argv ``mlflow run -e ENTRY_POINT -P ...`` would run, after ``python -m ...``."""
    from mlflow.projects._project_spec import load_project

    command = load_project(str(ROOT)).get_entry_point(entry_point).compute_command(params, None)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "taskcodec.cli.main"]
    return argv[3:]


RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(("entry_point", "config_cls", "params", "expected"), [
    ("train", TrainConfig, {}, {"N": 128, "init_from": "", "max_val_images": 0}),
    ("train", TrainConfig, {"N": 8.0, "lmbda": 0.05, "max_val_images": 1, "log_every": "1"},
     {"N": 8, "lmbda": 0.05, "max_val_images": 1, "log_every": 1}),
    ("evaluate", EvalConfig, {"checkpoint": RUN_ID}, {"checkpoint": RUN_ID, "jpeg": True}),
])
def test_mlproject_commands_parse_into_valid_configs(entry_point, config_cls, params, expected):
    argv = _rendered(entry_point, params)
    assert argv[0] == entry_point
    ctx = cli.commands[entry_point].make_context(entry_point, argv[1:])
    names = {f.name for f in config_cls.fields()}
    config = build_config(config_cls, {k: v for k, v in ctx.params.items() if k in names})
    assert {k: getattr(config, k) for k in expected} == expected
    assert all(type(getattr(config, k)) is type(v) for k, v in expected.items())


def test_mlproject_train_parameters_are_train_settings():
    import yaml

    spec = yaml.safe_load((ROOT / "MLProject").read_text())
    for entry_point, config_cls in (("train", TrainConfig), ("evaluate", EvalConfig)):
        declared = set(spec["entry_points"][entry_point]["parameters"])
        assert declared <= {f.name for f in config_cls.fields()}, entry_point


def test_mlproject_defaults_match_the_config_defaults():
    import yaml

    spec = yaml.safe_load((ROOT / "MLProject").read_text())
    defaults = TrainConfig.from_dict({})
    for name, declared in spec["entry_points"]["train"]["parameters"].items():
        if "default" in declared:
            assert TrainConfig.from_dict({name: declared["default"]}) == defaults, name


#: Options an MLProject entry point does not declare, and why. Each still reaches the command
#: as ``-P name=value`` (mlflow passes undeclared parameters on as ``--name value``), but mlflow
#: logs every declared parameter's default as the run's param, before the command runs.
MLPROJECT_LEFT_OUT = {
    "train": {
        # Taken from the --init-from checkpoint unless given.
        "codec", "N", "M",
        # Set by --recipe short-cpu beneath what is given: the default would be logged over
        # the value the preset sets.
        "lr", "lr_scheduler", "warmup_steps", "patch_size", "batch_size", "epoch_length",
        "rd_every",
        # Under `mlflow run` the run is mlflow's: named by `mlflow run --run-name`; continued
        # with the launchers' --run-id (resume would leave mlflow's run empty).
        "run_name", "resume",
    },
    "evaluate": {
        "codec", "data", "split",  # from the checkpoint and the folder
        "run_name",  # `mlflow run --run-name`
        "output_dir",  # a folder on the machine that runs it; the files are artifacts anyway
    },
    "compare": {"run_name"},  # `mlflow run --run-name`: compare logs into mlflow's run
    # As train: the architecture comes from --init-from unless given; the run is mlflow's.
    "train-base": {"task", "entropy_model", "N", "M", "run_name", "resume"},
    "train-enhancement": {"method", "target", "N", "M", "condition_decoder", "run_name",
                          "resume"},
}


def _mlproject_options(entry_point: str) -> dict[str, str]:
    """The command's options (by parameter name) -> the option in the entry point's command,
    or "" where it has none."""
    from mlflow.projects._project_spec import load_project

    words = set(load_project(str(ROOT)).get_entry_point(entry_point).command.split())
    command = cli.commands[entry_point]
    return {p.name: next((o for o in p.opts if o in words), "")
            for p in command.params if isinstance(p, click.Option) and p.name != "help"}


@pytest.mark.parametrize("entry_point", sorted(MLPROJECT_LEFT_OUT))
def test_mlproject_passes_every_option_of_the_command_but_those_left_out(entry_point):
    options = _mlproject_options(entry_point)
    left_out = MLPROJECT_LEFT_OUT[entry_point]
    assert left_out <= set(options), "an option left out that the command no longer has"
    missing = sorted(n for n, o in options.items() if not o and n not in left_out)
    assert missing == [], f"{entry_point}: declare these in MLProject or say why not"
    passed = sorted(n for n, o in options.items() if o and n in left_out)
    assert passed == [], f"{entry_point}: declared, yet listed as left out"


@pytest.mark.parametrize(("entry_point", "required"), [
    ("train", {}), ("train-base", {}), ("train-enhancement", {"base_run": RUN_ID}),
    ("evaluate", {"checkpoint": RUN_ID}), ("compare", {})])
def test_mlproject_defaults_are_the_commands_defaults(entry_point, required):
    """The command as ``mlflow run -e ENTRY_POINT`` renders it with the declared defaults
    parses into what the command alone would take."""
    from taskcodec import config as configs

    command = cli.commands[entry_point]
    given = [a for k, v in required.items() for a in (f"--{k.replace('_', '-')}", v)]
    params = dict(required)
    rendered = command.make_context(entry_point, _rendered(entry_point, params)[1:]).params
    bare = command.make_context(entry_point, list(given)).params

    def settled(values: dict) -> dict:
        # An empty MLProject parameter means "not given": the command drops empty list items.
        return {k: tuple(x for x in v if x) if isinstance(v, tuple) else v
                for k, v in values.items()}

    if entry_point == "compare":
        assert settled(rendered) == settled(bare)
    else:
        config_cls = next(c for c in vars(configs).values() if isinstance(c, type)
                          and getattr(c, "entry_point", "") == entry_point)
        names = {f.name for f in config_cls.fields()}
        assert build_config(config_cls, {k: v for k, v in rendered.items() if k in names}) == \
            build_config(config_cls, {k: v for k, v in bare.items() if k in names})


def test_a_recipe_under_mlflow_run_logs_the_values_it_trains_with():
    """mlflow logs the declared parameters before the command runs; none of them may be one
    the recipe or the --init-from checkpoint would set."""
    from mlflow.projects._project_spec import load_project

    from taskcodec.config import SHORT_CPU

    entry = load_project(str(ROOT)).get_entry_point("train")
    logged, _ = entry.compute_parameters({"recipe": "short-cpu"}, None)
    assert not set(logged) & (set(SHORT_CPU) | set(TrainConfig.architecture))
    config = build_config(TrainConfig, cli.commands["train"].make_context(
        "train", _rendered("train", {"recipe": "short-cpu"})[1:]).params)
    assert {k: getattr(config, k) for k in SHORT_CPU} == SHORT_CPU
    from taskcodec.config import BaseConfig, EnhancementConfig

    for cls in (BaseConfig, EnhancementConfig):  # their architecture, from --init-from
        declared = load_project(str(ROOT)).get_entry_point(cls.entry_point).parameters
        assert not set(declared) & set(cls.architecture), cls.entry_point


def test_environment_does_not_leak_into_the_config(monkeypatch):
    monkeypatch.setenv("TASKCODEC_RESUME_RUN_ID", "0" * 32)  # read by the engine, not here
    assert TrainConfig.from_dict({}).resume == ""
    assert os.environ["TASKCODEC_RESUME_RUN_ID"] == "0" * 32
