"""The bridge from the core's ``LogFn`` to MLflow: kedro-mlflow opens the run, nodes log into it."""

from __future__ import annotations

import mlflow

from rlhf_pipeline.training.engine import LogFn, world


def mlflow_logger(prefix: str) -> LogFn:
    """A ``LogFn`` logging ``<prefix>/<name>`` metrics to the active MLflow run (rank 0 only)."""

    def log(metrics: dict[str, float], step: int) -> None:
        if mlflow.active_run() is not None and world()[0] == 0:
            mlflow.log_metrics({f"{prefix}/{name}": float(value) for name, value in metrics.items()}, step=step)

    return log

