"""``mlflow run`` that stops gracefully on SIGTERM: ``python -m taskcodec.launch.mlflow_run
PROJECT -e ENTRY ...`` takes exactly the arguments of ``mlflow run``.

Why: Kubernetes stops a pod (preemption, eviction, ``kubectl delete``) with SIGTERM to the
container's main process, here ``mlflow run``. Plain ``mlflow run`` dies at once on SIGTERM and
leaves the training process orphaned, to be killed without a checkpoint when the container
ends. On Ctrl-C (SIGINT), however, ``mlflow run`` sends SIGTERM to the training process and
waits for it, and the trainer then writes its checkpoint and exits with status 75. So this
wrapper treats SIGTERM like Ctrl-C, and exits 75 ("preempted, retry me") after a stop, which
the Job's pod failure policy does not count as a failure.

After such a stop ``mlflow run`` marks the run FAILED over the trainer's KILLED (mlflow 3.17
compares the status string with status numbers, so it never sees that the run has ended); the
wrapper puts KILLED back, so a preempted run does not look like a broken one.
"""

from __future__ import annotations

import signal
import sys

from taskcodec.signals import PREEMPTED_EXIT


def _run_id(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg == "--run-id" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--run-id="):
            return arg.split("=", 1)[1]
    return ""


def _mark_killed(run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().set_terminated(run_id, "KILLED")
    except Exception as exc:  # the server may be away; the status is cosmetic, the exit is not
        print(f"mlflow run: could not mark run {run_id} KILLED: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import click
    from mlflow.cli import cli

    stopped = False

    def _interrupt(signum, frame):
        nonlocal stopped
        stopped = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough; let the checkpoint finish
        raise KeyboardInterrupt(f"signal {signum}")

    args = sys.argv[1:] if argv is None else list(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cli.main(args=["run", *args], prog_name="mlflow", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        # mlflow has already stopped the training process and waited for its checkpoint.
        if not stopped:
            return 130
        if _run_id(args):
            _mark_killed(_run_id(args))
        return PREEMPTED_EXIT
    except click.ClickException as exc:  # a usage error: say it as mlflow would
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # mlflow's ExecutionException: the entry point failed
        print(f"mlflow run: {exc}", file=sys.stderr)
        return 1
    return PREEMPTED_EXIT if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
