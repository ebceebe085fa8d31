"""What taskcodec tells MLflow itself, through MLflow's plugin entry points (pyproject.toml).

``mlflow.default_experiment_provider``: a run created without an experiment named anywhere
(``mlflow run . -e train`` with neither ``--experiment-name`` nor ``$MLFLOW_EXPERIMENT_NAME``)
goes to the ``taskcodec`` experiment, where ``taskcodec`` commands put theirs and where
``taskcodec compare`` looks, instead of MLflow's "Default". MLflow asks this provider only when
neither its command line nor ``$MLFLOW_EXPERIMENT_NAME`` / ``$MLFLOW_EXPERIMENT_ID`` chose one.

Kept free of taskcodec's other modules: MLflow loads it in every process that imports it.
"""

from __future__ import annotations

DEFAULT_EXPERIMENT = "taskcodec"


class DefaultExperimentProvider:
    """MLflow's default-experiment provider interface: ``in_context`` and ``get_experiment_id``."""

    def in_context(self) -> bool:
        return True  # installed with taskcodec: in its environment, runs belong to taskcodec

    def get_experiment_id(self) -> str:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(DEFAULT_EXPERIMENT)
