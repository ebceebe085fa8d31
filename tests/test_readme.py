"""The README as a user reads it: every command it shows exists with the options it uses, the
cheap ones run, and the generated parts (make targets, layout) match the repository.

Commands are taken from the ``bash`` blocks and from inline code that starts with a command;
placeholders such as RUN_ID only ever stand for values, so they need no special case except
where a command really runs. Every ``--help`` is asked in this process (Click's CliRunner).

``python tests/test_readme.py`` rewrites the make-targets table from ``make help``.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOOLS = re.compile(r"^(taskcodec|slurm-[a-z]+|k8s-[a-z]+|make|mlflow)$")
SEPARATORS = {"&&", "||", ";", "|", "&"}
MAKE_TABLE = re.compile(r"(\| target \| what it does \|\n\|---\|---\|\n)((?:\|.*\|\n)+)")


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    line: str  # as written, for messages

    @property
    def tool(self) -> str:
        return self.argv[0]


def _code(text: str) -> list[str]:
    """The shell text of the README: ```bash blocks (also indented ones) and inline code."""
    blocks = [re.sub(r"(?m)^" + re.escape(indent), "", body)
              for indent, body in re.findall(r"(?m)^( *)```bash\n(.*?)^\1```", text, re.S)]
    outside = re.sub(r"(?ms)^ *```.*?^ *```", "", text)
    inline = [" ".join(span.split()) for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", outside)]
    return blocks + [s for s in inline if TOOLS.match(_first_word(s))]


def _first_word(line: str) -> str:
    words = [w for w in line.split() if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    return words[0] if words else ""


def _expand(line: str, variables: dict[str, str]) -> str:
    """``$NAME`` / ``${NAME}`` of the block's own assignments, as the shell would expand them."""
    return re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?",
                  lambda m: variables.get(m.group(1), m.group(0)), line)


def commands(text: str) -> list[Command]:
    found = []
    for code in _code(text):
        variables: dict[str, str] = {}  # NAME=value lines of this block
        for line in code.replace("\\\n", " ").splitlines():
            line = _expand(line, variables)
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue  # not shell (a table row, a sentence)
            if words and all(re.match(r"^[A-Z_][A-Z0-9_]*=", w) for w in words):
                variables.update(w.split("=", 1) for w in words)
                continue
            part: list[str] = []
            for word in [*words, ";"]:
                if word not in SEPARATORS:
                    part.append(word)
                    continue
                while part and re.match(r"^[A-Z_][A-Z0-9_]*=", part[0]):
                    part.pop(0)  # VAR=value before a command
                if part and TOOLS.match(part[0]) and (part[0] != "mlflow" or part[1:2] == ["run"]):
                    found.append(Command(tuple(part), line.strip()))
                part = []
    return found


README_COMMANDS = commands(README.read_text())


# -- what exists ---------------------------------------------------------------------------------
@cache
def console_scripts() -> dict[str, click.Command]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    out = {}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        out[name] = obj if isinstance(obj, click.Command) else \
            importlib.import_module(module).cli  # a main() that calls the group
    return out


@cache
def make_help() -> dict[str, str]:
    out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "help"],
                         capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(?m)^\s*make (\S+)\s+(.*?)\s*$", out))


@cache
def mlproject() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "MLProject").read_text())["entry_points"]


def option_names(command: click.Command) -> dict[str, click.Parameter]:
    names = {o: p for p in command.params for o in (*p.opts, *p.secondary_opts)
             if isinstance(p, click.Option)}
    for o in command.get_help_option_names(click.Context(command)):
        names[o] = None
    return names


def check_options(command: click.Command, words: tuple[str, ...], where: str) -> list[str]:
    """The options among ``words`` that ``command`` does not have."""
    names = option_names(command)
    bad, skip = [], False
    for i, word in enumerate(words):
        if skip or not word.startswith("-") or re.match(r"^-\d", word) or word == "-":
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name not in names:
            bad.append(f"{where}: {command.name} has no option {name}")
            continue
        param = names[name]
        takes_value = param is not None and not param.is_flag and not param.count
        optional = param is not None and getattr(param, "_flag_needs_value", False)
        nxt = words[i + 1] if i + 1 < len(words) else ""
        skip = takes_value and "=" not in word and not (optional and nxt.startswith("--"))
    return bad


def entry_point_params(entry_point: str) -> set[str]:
    """What ``-P NAME=VALUE`` may name: the MLProject's parameters, else the options of the
    taskcodec command of that name (passed on as --NAME)."""
    declared = set(mlproject()[entry_point]["parameters"])
    command = console_scripts()["taskcodec"].commands[entry_point]
    return declared | {o.lstrip("-") for o in option_names(command) if o.startswith("--")}


def check_params(entry_point: str, words: tuple[str, ...], where: str) -> list[str]:
    if entry_point not in mlproject():
        return [f"{where}: no MLProject entry point {entry_point!r}"]
    known = entry_point_params(entry_point)
    bad = []
    for flag, value in zip(words, words[1:]):
        if flag in ("-P", "--param", "--sweep"):
            name = value.split("=", 1)[0]
            if name not in known and name.replace("_", "-") not in known:
                bad.append(f"{where}: entry point {entry_point} has no parameter {name}")
    return bad


def subcommand(command: Command) -> tuple[click.Command, tuple[str, ...]]:
    """The Click command a README command calls, and its words after the command name."""
    root = console_scripts()[command.tool]
    words = command.argv[1:]
    if isinstance(root, click.Group):
        while words and words[0].startswith("-"):
            words = words[1:]
        if not words:
            return root, ()  # the group itself (`taskcodec`, `taskcodec --version`)
        return root.commands[words[0]], words[1:]
    return root, words


def problems(command: Command) -> list[str]:
    where = command.line
    if command.tool == "make":
        targets = [w for w in command.argv[1:] if "=" not in w and not w.startswith("-")]
        return [f"{where}: make has no target {t}" for t in targets if t not in make_help()]
    if command.tool == "mlflow":
        words = command.argv
        if "-e" not in words:
            return []  # a mention (`mlflow run --run-id RUN_ID`), not a command to check
        return check_params(words[words.index("-e") + 1], words, where)
    if command.tool not in console_scripts():
        return [f"{where}: no console script {command.tool}"]
    root = console_scripts()[command.tool]
    if isinstance(root, click.Group):
        name = next((w for w in command.argv[1:] if not w.startswith("-")), None)
        if name is not None and name not in root.commands:
            return [f"{where}: taskcodec has no command {name}"]
        if name is None:
            return check_options(root, command.argv[1:], where)
    cmd, words = subcommand(command)
    bad = check_options(cmd, words, where)
    if command.tool.endswith("-launch") and words and not words[0].startswith("-"):
        bad += check_params(words[0], words, where)
    return bad


def test_the_readme_shows_commands_of_every_kind():
    tools = {c.tool for c in README_COMMANDS}
    assert {"taskcodec", "make", "mlflow", "slurm-launch", "k8s-launch"} <= tools
    assert len(README_COMMANDS) > 40


def test_every_readme_command_and_option_exists():
    bad = [p for c in README_COMMANDS for p in problems(c)]
    assert bad == []


def test_the_checks_see_a_wrong_option_target_and_parameter():
    wrong = commands("```bash\ntaskcodec evaluate --checkpoint RUN_ID --dataset x\n"
                     "make tests\nmlflow run . -e train -P lamda=1\n"
                     "slurm-launch train -P lmbda=1 --gpu 1\n```\n")
    assert [len(problems(c)) for c in wrong] == [1, 1, 1, 1]


def test_every_command_the_readme_uses_answers_help():
    runner = CliRunner()
    seen = set()
    for command in README_COMMANDS:
        if command.tool in ("make", "mlflow"):
            continue
        cmd, _ = subcommand(command)
        if (command.tool, cmd.name) in seen:
            continue
        seen.add((command.tool, cmd.name))
        result = runner.invoke(cmd, ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, command.line
    assert len(seen) >= 12


# -- the cheap ones, run -------------------------------------------------------------------------
def run(command: Command, *, replace: dict[str, str] | None = None, extra: tuple = ()):
    argv = [(replace or {}).get(w, w) for w in command.argv]
    for old, new in (replace or {}).items():
        argv = [w.replace(old, new) for w in argv]
    cmd, words = subcommand(Command(tuple(argv), command.line))
    return CliRunner().invoke(cmd, [*words, *extra])


def test_the_dry_runs_print_and_send_nothing(tmp_path, monkeypatch):
    """Every dry run of the README, and each slurm-launch with --dry-run added (no --run-id)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a server nobody runs
    ran = 0
    for command in README_COMMANDS:
        launch = command.tool in ("slurm-launch", "k8s-launch") and len(command.argv) > 2
        if "--dry-run" in command.argv or (launch and "--run-id" not in command.argv):
            extra = () if "--dry-run" in command.argv else ("--dry-run",)
            result = run(command, extra=extra)
            assert result.exit_code == 0, f"{command.line}\n{result.output}"
            assert "nothing" in result.output and "apiVersion" in result.output or \
                "#SBATCH" in result.output, command.line
            ran += 1
    assert ran >= 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, module_env) -> Path:
    from taskcodec.config import TrainConfig
    from taskcodec.engine import train

    folder = tmp_path_factory.mktemp("readme-run")
    with module_env(f"sqlite:///{folder / 'mlflow.db'}", folder, "readme"):
        train(TrainConfig.from_dict({"N": 8, "M": 8, "patch_size": 32, "batch_size": 2,
                                     "epochs": 1, "epoch_length": 2, "max_val_images": 1,
                                     "max_side": 128, "checkpoint_dir": str(folder / "c")}))
    return folder / "c" / "last.pt"


def test_compress_then_decompress_as_written(checkpoint, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    pair = [c for c in README_COMMANDS if c.tool == "taskcodec" and c.argv[1:2] in
            (("compress",), ("decompress",)) and "kodim01" in " ".join(c.argv)]
    assert [c.argv[1] for c in pair] == ["compress", "decompress"]
    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save("kodim01.png")
    for command in pair:
        result = run(command, replace={"RUN_ID": str(checkpoint)})
        assert result.exit_code == 0, f"{command.line}\n{result.output}"
    (decoded,) = [Path(w) for w in pair[1].argv if w.endswith("-decoded.png")]
    with Image.open(decoded) as img:
        assert img.size == (56, 40)


def log_evaluate_runs() -> dict[str, list[str]]:
    """Eight evaluate runs in the experiment taskcodec: two codecs at four rates, with JPEG."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment("taskcodec")
    ids: dict[str, list[str]] = {}
    for codec, gain in (("bmshj2018-factorized", 0.0), ("mbt2018-mean", 1.0)):
        for i, bpp in enumerate((0.1, 0.2, 0.4, 0.8)):
            run_id = client.create_run(experiment, tags={
                "entry_point": "evaluate", "method": codec, "codec": codec,
                "data_name": "kodak", "data_digest": "1a2b3c4d5e6f7a8b"}).info.run_id
            psnr = 26 + 3 * i + gain
            metrics = {"bpp": bpp, "bpp_estimated": 0.98 * bpp, "psnr": psnr, "ms_ssim": 0.9 + 0.02 * i,
                       "jpeg_bpp": bpp * 1.01, "jpeg_psnr": psnr - 3, "jpeg_ms_ssim": 0.85 + 0.02 * i}
            client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                             params=[Param("N", "128"), Param("lmbda", str(0.001 * 2 ** i))])
            client.set_terminated(run_id)
            ids.setdefault(codec, []).append(run_id)
    return ids


def test_compare_as_written_on_logged_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ids = log_evaluate_runs()
    (tmp_path / "kodak").mkdir()
    (tmp_path / "kodak" / "jpeg.json").write_text(json.dumps(
        {"name": "JPEG", "results": {"bpp": [0.1, 0.2, 0.4, 0.8],
                                     "psnr": [24.0, 27.0, 30.0, 33.0]}}))
    placeholders = {f"RUN{i + 1}": run_id for i, run_id in enumerate(ids["mbt2018-mean"])}
    ran = 0
    for command in README_COMMANDS:
        words = command.argv
        anchor = words[words.index("--anchor") + 1] if "--anchor" in words else "JPEG"
        if words[:2] != ("taskcodec", "compare") or anchor not in ("JPEG", *ids):
            continue  # the scalable section's comparisons need scalable runs
        result = run(command, replace=placeholders)
        assert result.exit_code == 0, f"{command.line}\n{result.output}"
        assert "MLflow run: " in result.output
        ran += 1
    assert ran >= 5


# -- what the README says about the repository ---------------------------------------------------
def render_make_table() -> str:
    return "".join(f"| `make {t}` | {what} |\n" for t, what in make_help().items())


def test_make_targets_table_is_make_help():
    table = MAKE_TABLE.search(README.read_text())
    assert table, "no make-targets table in the README"
    assert table.group(2) == render_make_table(), "run: python tests/test_readme.py"


def test_layout_names_every_module():
    text = README.read_text()
    layout = text[text.index("## Layout"):text.index("## Development")]
    package = ROOT / "src" / "taskcodec"
    missing = [p.name for p in package.glob("*.py") if p.name != "__init__.py"
               and p.name not in layout]
    missing += [f"{p.name}/" for p in package.iterdir() if p.is_dir()
                and (p / "__init__.py").exists() and f"{p.name}/" not in layout]
    launch = layout[layout.index("launch/"):layout.index("cli/")]
    missing += [f"launch/{p.name}" for p in (package / "launch").glob("*.py")
                if p.name != "__init__.py" and p.name not in launch]
    assert missing == []


def test_creating_an_account_logs_in_as_the_admin():
    blocks = [b for b in _code(README.read_text()) if "create_user" in b]
    assert blocks, "the README no longer shows how to create an account"
    for block in blocks:
        before = block[:block.index("create_user")]
        assert "MLFLOW_TRACKING_USERNAME=admin" in before and "MLFLOW_TRACKING_PASSWORD=" in before


def test_the_quick_marker_expression_leaves_out_servers_and_browsers():
    expression = re.search(r'pytest -m "([^"]+)"` for the quick ones', README.read_text()).group(1)
    files = ["tests/test_mlflow_server.py", "tests/test_ui_browser.py",
             "tests/test_mlflow_project.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                          "no:cacheprovider", "-m", expression, *files], cwd=ROOT,
                         capture_output=True, text=True, timeout=300).stdout
    selected = [line for line in out.splitlines() if "::" in line]
    # A server, a browser, mlflow run subprocesses: none of it is quick.
    assert selected == ["tests/test_mlflow_project.py::"
                        "test_an_artifact_store_the_run_cannot_write_is_one_error_at_the_start"]


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(MAKE_TABLE.sub(lambda m: m.group(1) + render_make_table(), text, count=1))
    print("README.md: make-targets table rewritten from `make help`")
