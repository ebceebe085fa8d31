"""Click options generated from a config dataclass, so the CLI, MLProject and the config
never disagree. Each field ``lmbda`` becomes ``--lmbda`` (``patch_size`` answers to both
``--patch-size`` and ``--patch_size``, the spelling ``mlflow run`` uses for extra params)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import click

from taskcodec.cli.errors import fail
from taskcodec.config import Config, LoopConfig, _coerce, _type_of
from taskcodec.errors import ConfigError

# Numbers and booleans are parsed by the config, which accepts what MLflow renders ("128.0"
# for an integer declared as float in MLProject) and names the setting in its error.
_CLICK_TYPES = {int: click.STRING, float: click.STRING, bool: click.STRING, str: click.STRING}
_METAVARS = {int: "INTEGER", float: "FLOAT", bool: "BOOL", str: "TEXT"}


def config_options(config_cls: type[Config]) -> Callable:
    """Decorate a command with one option per config field (defaults shown in --help)."""

    def decorator(func: Callable) -> Callable:
        for f in reversed(config_cls.fields()):
            meta = f.metadata
            kind = _type_of(f)
            names = [f"--{f.name.replace('_', '-')}"]
            if "_" in f.name:
                names.append(f"--{f.name}")
            click_type = (click.Choice(meta["choices"]) if meta.get("choices")
                          else _CLICK_TYPES[kind])
            metavar = None if meta.get("choices") else _METAVARS[kind]
            func = click.option(*names, f.name, type=click_type, default=None, metavar=metavar,
                                help=f"{meta['help']} [default: {_show(f.default)}]")(func)
        return func

    return decorator


def _show(value: Any) -> str:
    return '""' if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def build_config(config_cls: type[Config], values: dict[str, Any]) -> Config:
    """The config from the options the user gave (unset options keep their defaults).

    Under ``--recipe NAME`` an option equal to its default does not override the preset:
    ``mlflow run`` (MLProject) passes every declared parameter, defaults included.
    """
    given = {k: v for k, v in values.items() if v is not None}
    preset = config_cls.presets.get(str(given.get("recipe", "")), {})
    fields = {f.name: f for f in config_cls.fields()}
    for name in set(preset) & set(given):
        try:
            value = _coerce(name, given[name], _type_of(fields[name]))
        except ConfigError:
            continue  # from_dict reports it
        if value == fields[name].default:
            del given[name]
    return config_cls.from_dict(given)


def config_command(config_cls: type[Config]) -> Callable:
    """Collect the generated options into one ``config`` argument of the command."""

    def decorator(func: Callable) -> Callable:
        names = {f.name for f in dataclasses.fields(config_cls)}

        @functools.wraps(func)
        def wrapper(**kwargs):
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return func(build_config(config_cls, values), **kwargs)

        return config_options(config_cls)(wrapper)

    return decorator


def _switch_options() -> list[Callable]:
    """--precision, --tf32, --compile, --channels-last: the training speed switches as launcher
    options (each is ``-P NAME=VALUE``; choices from the config, GPU values from
    taskcodec.launch.spec.GPU_SWITCHES)."""
    fields = {f.name: f for f in LoopConfig.fields()}

    def choice(name: str) -> click.Choice:
        return click.Choice(fields[name].metadata["choices"])

    return [
        click.option("--precision", type=choice("precision"), default=None,
                     help="training precision: autocast of the transforms, the entropy models "
                          "and the rate stay fp32 [default: auto, written into the command with "
                          "--gpus > 0: bf16 on a GPU with bf16 units (Ampere or newer), fp32 "
                          "elsewhere; give fp16 for V100 or T4]"),
        click.option("--tf32/--no-tf32", default=None,
                     help="TF32 matmuls and convolutions [default: on; written into the "
                          "command with --gpus > 0; no effect on a CPU]"),
        click.option("--compile", "compile_", type=choice("compile"), default=None,
                     help="torch.compile the training forward [default: the trainer's auto: "
                          "on a GPU, on a CPU only for long runs]"),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="channels_last memory layout [default: the trainer's: on]"),
    ]


#: Keyword of each switch option -> the setting it passes.
_SWITCH_KWARGS = {"precision": "precision", "tf32": "tf32", "compile_": "compile",
                  "channels_last": "channels_last"}


def _fold_switches(func: Callable) -> Callable:
    """Pass the switch options on as ``-P`` parameters of the command."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        items = list(kwargs.get("params") or ())
        given = {item.partition("=")[0].strip(): item for item in items}
        for key, name in _SWITCH_KWARGS.items():
            value = kwargs.pop(key)
            if value is None:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if name in given:
                fail(ConfigError(f"--{name.replace('_', '-')} {text} and -P {given[name]} "
                                 f"both set {name}: give it once"))
            items.append(f"{name}={text}")
        kwargs["params"] = tuple(items)
        return func(*args, **kwargs)

    return wrapper


def job_options(job: str, pass_env_help: str) -> Callable:
    """The options both launchers share, with one meaning each (``job``: what one parameter
    combination becomes, e.g. "array task"). Defaults are None: each launcher fills its own.
    The speed switches (--precision ...) reach the command as ``-P`` parameters."""
    options = [
        click.option("-P", "--param", "params", multiple=True, metavar="NAME=VALUE",
                     help="entry point parameter (repeatable): any setting of its config"),
        click.option("--sweep", multiple=True, metavar="NAME=V1,V2,...",
                     help=f"one {job} (and MLflow run) per combination (repeatable: the cross "
                          "product)"),
        *_switch_options(),
        click.option("-e", "--env", "env_items", multiple=True, metavar="NAME=VALUE",
                     help="set a variable in the job; the value is written into it, so "
                          "credential-looking names are refused (repeatable)"),
        click.option("--pass-env", multiple=True, metavar="NAME",
                     help=f"give the job the value NAME has in your environment (refused if "
                          f"unset; repeatable); {pass_env_help}"),
        click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", metavar="URI",
                     help="MLflow server the jobs log to, reachable from them "
                          "[env: MLFLOW_TRACKING_URI]"),
        click.option("--experiment", default=None, envvar="MLFLOW_EXPERIMENT_NAME",
                     metavar="NAME", help="MLflow experiment [env: MLFLOW_EXPERIMENT_NAME; "
                                          "default: taskcodec]"),
        click.option("--run-id", default=None, metavar="RUN_ID",
                     help="continue this MLflow run instead of a new one: its parameters "
                          "reused, training resumed from its last checkpoint"),
    ]

    def decorator(func: Callable) -> Callable:
        func = _fold_switches(func)
        for option in reversed(options):
            func = option(func)
        return func

    return decorator
