"""Preemption signals (SIGTERM, SIGUSR1), caught from the very start of a command.

Slurm and Kubernetes send them before stopping a job. Wrappers such as ``mlflow run`` may
ignore them, and a child inherits "ignored"; so the CLI installs these handlers before its
slow imports, and a signal that arrives while torch is still loading is remembered: the
training loop then checkpoints and exits with status 75 at its first step instead of being
killed later without a checkpoint. Torch-free on purpose.
"""

from __future__ import annotations

import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: Exit status after a checkpoint written on one of them: "preempted, requeue me". The one
#: definition: the trainer, the CLI, mlflow_run and both launchers (Slurm script, the Job's
#: pod failure policy) use this name.
PREEMPTED_EXIT = 75
received: int | None = None
_previous: dict[int, object] = {}


def _record(signum, frame) -> None:
    global received
    received = signum


def install() -> None:
    """Catch the preemption signals (idempotent: the first call keeps the old handlers)."""
    for sig in PREEMPTION_SIGNALS:
        old = signal.signal(sig, _record)
        if old is not _record:
            _previous[sig] = old


def uninstall() -> None:
    """Give the signals back to their previous handlers and forget what was received."""
    global received
    for sig, old in _previous.items():
        signal.signal(sig, old)
    _previous.clear()
    received = None


def name() -> str:
    return signal.Signals(received or signal.SIGTERM).name
