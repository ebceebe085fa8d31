"""``taskcodec doctor``: check the tracking setup of this machine in seconds."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.option("--experiment", envvar="MLFLOW_EXPERIMENT_NAME", metavar="NAME", default=None,
              help="experiment to check [env: MLFLOW_EXPERIMENT_NAME; default: taskcodec]")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, metavar="SECONDS", help="limit for each request")
@click.option("--json", "as_json", is_flag=True, help="print the results as one JSON object")
def doctor(experiment: str | None, timeout: float, as_json: bool) -> None:
    """Check that runs can be logged: tracking server reachable, credentials accepted,
    experiment usable, artifact upload and download working.

    Each failure is one line that ends with its fix. Exit status 0 when every check passed,
    1 otherwise. The artifact check uploads a small file into a throwaway run of the
    experiment and deletes both afterwards; a missing experiment is created.

    \b
    Examples:
      taskcodec doctor
      MLFLOW_TRACKING_URI=https://mlflow.lab.example taskcodec doctor --json
    """
    from taskcodec import tracking
    from taskcodec.doctor import passed, report, run_checks

    uri = tracking.tracking_uri()
    experiment = experiment or tracking.experiment_name()
    checks = run_checks(uri, experiment, timeout)
    if as_json:
        click.echo(json.dumps(report(uri, experiment, checks), indent=2))
    else:
        summary = report(uri, experiment, checks)
        click.echo(f"tracking URI {summary['tracking_uri']}, experiment {experiment!r}")
        for check in checks:
            click.echo(check.line())
        click.echo("all checks passed" if passed(checks) else "some checks failed")
    sys.exit(0 if passed(checks) else 1)
