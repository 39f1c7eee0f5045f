"""The pipelines' link to MLflow: the core's ``LogFn`` for live curves, and final metrics in the shape of
kedro-mlflow's ``MlflowMetricsHistoryDataset``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlflow

from rlhf_pipeline.reporting import is_number

if TYPE_CHECKING:
    from rlhf_pipeline.training.engine import LogFn


def mlflow_logger(prefix: str) -> LogFn:
    """A ``LogFn`` logging ``<prefix>/<name>`` metrics to the active MLflow run (rank 0 only); missing
    values (None, NaN) are left out."""
    from rlhf_pipeline.training.engine import world

    def log(metrics: dict[str, float], step: int) -> None:
        if mlflow.active_run() is not None and world()[0] == 0:
            mlflow.log_metrics({f"{prefix}/{name}": float(value) for name, value in metrics.items() if is_number(value)},
                               step=step)

    return log


def as_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, dict[str, float]]:
    """``metrics`` (a stage's JSON summary, nested dicts allowed) as ``{"<prefix>/<key>[/<key>…]": {"value", "step":
    0}}`` for an ``MlflowMetricsHistoryDataset``; values that are not finite numbers are left out."""
    flat: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(as_metrics(value, f"{prefix}/{key}"))
        elif is_number(value):
            flat[f"{prefix}/{key}"] = {"value": float(value), "step": 0}
    return flat
