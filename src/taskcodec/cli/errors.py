"""How every taskcodec command ends on a taskcodec error: one ``Error:`` line, exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import click

from taskcodec.errors import TaskcodecError


def fail(err: BaseException) -> None:
    click.echo(f"Error: {err}", err=True)
    sys.exit(2)


class OneLineErrors:
    """Click mixin: a taskcodec error raised by the command becomes one line, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except TaskcodecError as err:
            fail(err)


class Group(OneLineErrors, click.Group):
    pass


class Command(OneLineErrors, click.Command):
    pass


def one_line_errors(func: Callable) -> Callable:
    """The same for a plain function (a command body)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TaskcodecError as err:
            fail(err)

    return wrapper
