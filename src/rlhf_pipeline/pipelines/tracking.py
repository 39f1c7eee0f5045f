"""The pipelines' reporting helpers: the core's ``LogFn`` to MLflow, and metrics as strict JSON."""

from __future__ import annotations

import math
from typing import Any

import mlflow

from rlhf_pipeline.training.engine import LogFn, world


def is_number(value: Any) -> bool:
    """A finite int/float (not a bool, None or NaN): what a metric store can hold."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by ``None``, so that the JSON written is strict
    (``null``, never the bare ``NaN`` that jq, JavaScript and strict parsers reject)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mlflow_logger(prefix: str) -> LogFn:
    """A ``LogFn`` logging ``<prefix>/<name>`` metrics to the active MLflow run (rank 0 only); missing
    values (None, NaN) are left out."""

    def log(metrics: dict[str, float], step: int) -> None:
        if mlflow.active_run() is not None and world()[0] == 0:
            mlflow.log_metrics({f"{prefix}/{name}": float(value) for name, value in metrics.items() if is_number(value)},
                               step=step)

    return log
