"""Many trainings and evaluations in one Python process: a plan of steps, run in order.

Each CLI start pays seconds of imports (torch, compressai, mlflow); a replicate study starts
dozens. A plan is a list of steps, each a command (``train``, ``train-base``,
``train-enhancement``, ``evaluate``) with the settings its ``--help`` lists (underscored:
``base_run``, ``max_steps``). A string setting may name an earlier step's run as
``${STEP}``: ``base_run: ${base-s0}``, ``checkpoint: ${enh-s0}``. Every setting is checked
before the first step runs, so a typo in the last step does not cost the whole plan.

From Python::

    from taskcodec.driver import run_plan
    runs = run_plan([{"name": "b0", "command": "train-base", "options": {"task": "depth"}},
                     {"name": "e0", "command": "evaluate", "options": {"checkpoint": "${b0}"}}])
    runs["e0"].run_id

From a shell: ``taskcodec run-plan PLAN.yaml`` (YAML or JSON: ``{"steps": [...]}`` or a bare
list, with optional ``defaults: {COMMAND: {setting: value}}`` under every step of that
command). Clusters keep using ``--sweep seed=...``: one job per run.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskcodec.config import BaseConfig, Config, EnhancementConfig, EvalConfig, TrainConfig
from taskcodec.errors import ConfigError

COMMANDS: dict[str, type[Config]] = {"train": TrainConfig, "train-base": BaseConfig,
                                     "train-enhancement": EnhancementConfig,
                                     "evaluate": EvalConfig}
_REF = re.compile(r"\$\{([^}]+)\}")
_PLACEHOLDER = "0" * 32  # stands for a run id while the plan is checked


@dataclass(frozen=True)
class Step:
    name: str
    command: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    command: str
    run_id: str
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)  # evaluate: summary, data, ...


def parse_steps(items: Sequence[Any], defaults: Mapping[str, Mapping[str, Any]] | None = None
                ) -> list[Step]:
    """Steps from dicts ``{name, command, options}``, checked: known commands, unique names,
    ``${STEP}`` naming an earlier step, settings each command accepts."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ConfigError(f"a plan is a list of steps, not {type(items).__name__}")
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(COMMANDS))
    if unknown:
        raise ConfigError(f"plan defaults for unknown command {unknown[0]!r} "
                          f"(commands: {', '.join(COMMANDS)})")
    steps: list[Step] = []
    for i, item in enumerate(items):
        if isinstance(item, Step):
            item = {"name": item.name, "command": item.command, "options": item.options}
        if not isinstance(item, Mapping):
            raise ConfigError(f"plan step {i + 1} is not a mapping with name, command, options")
        extra = sorted(set(item) - {"name", "command", "options"})
        if extra:
            raise ConfigError(f"plan step {i + 1}: unknown key {extra[0]!r} "
                              "(a step has name, command, options)")
        command = str(item.get("command", ""))
        if command not in COMMANDS:
            raise ConfigError(f"plan step {i + 1}: command {command!r} is not one of "
                              f"{', '.join(COMMANDS)}")
        name = str(item.get("name") or f"step{i + 1}")
        if any(s.name == name for s in steps):
            raise ConfigError(f"plan step {i + 1}: name {name!r} is used twice")
        options = item.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"plan step {name!r}: options is not a mapping")
        step = Step(name, command, {**defaults.get(command, {}), **options})
        _check_step(step, {s.name for s in steps})
        steps.append(step)
    return steps


def _resolve(value: Any, runs: Mapping[str, str], step: str) -> Any:
    if not isinstance(value, str):
        return value

    def run_of(match: re.Match) -> str:
        ref = match.group(1)
        if ref not in runs:
            raise ConfigError(f"plan step {step!r}: ${{{ref}}} names no earlier step")
        return runs[ref]

    return _REF.sub(run_of, value)


def _check_step(step: Step, earlier: set[str]) -> None:
    placeholders = dict.fromkeys(earlier, _PLACEHOLDER)
    values = {k: _resolve(v, placeholders, step.name) for k, v in step.options.items()}
    try:
        COMMANDS[step.command].from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"plan step {step.name!r} ({step.command}): {err}") from None


def load_plan(path: Path | str) -> list[Step]:
    """A plan file: YAML or JSON, ``{"steps": [...], "defaults": {...}}`` or a bare list."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read plan {path}: {str(err).splitlines()[0]}") from None
    if isinstance(doc, Mapping):
        return parse_steps(doc.get("steps") or [], doc.get("defaults"))
    return parse_steps(doc if doc is not None else [])


def run_step(step: Step, runs: Mapping[str, str]) -> StepResult:
    """One step in this process: train (engine.train) or evaluate (evaluate.evaluate)."""
    options = {k: _resolve(v, runs, step.name) for k, v in step.options.items()}
    config = COMMANDS[step.command].from_dict(options)
    start = time.monotonic()
    if step.command == "evaluate":
        from taskcodec.evaluate import evaluate

        result = evaluate(config)  # type: ignore[arg-type]
        return StepResult(step.name, step.command, result["run_id"],
                          time.monotonic() - start, result)
    from taskcodec.engine import train

    run_id = train(config)  # type: ignore[arg-type]
    return StepResult(step.name, step.command, run_id, time.monotonic() - start)


def run_plan(steps: Sequence[Step | Mapping[str, Any]], *,
             on_step: Callable[[StepResult], None] | None = None) -> dict[str, StepResult]:
    """Run every step in order in this process; the results by step name. The whole plan is
    checked first; a failing step stops the plan (its error, naming the step, is raised)."""
    checked = parse_steps(steps)
    if os.environ.get("MLFLOW_RUN_ID"):  # every step would take over that one run
        raise ConfigError("a plan makes one MLflow run per step: it cannot run inside "
                          "`mlflow run` ($MLFLOW_RUN_ID is set)")
    results: dict[str, StepResult] = {}
    for step in checked:
        try:
            result = run_step(step, {k: r.run_id for k, r in results.items()})
        except ConfigError as err:
            raise ConfigError(f"plan step {step.name!r} ({step.command}): {err}") from None
        results[step.name] = result
        if on_step:
            on_step(result)
    return results


def write_results(results: Mapping[str, StepResult], path: Path | str) -> Path:
    """``{step: {command, run_id, seconds}}`` as JSON, for scripts that go on from there."""
    path = Path(path)
    path.write_text(json.dumps({k: {"command": r.command, "run_id": r.run_id,
                                    "seconds": round(r.seconds, 2)}
                                for k, r in results.items()}, indent=2) + "\n")
    return path
