"""A versioned directory written by ``save_pretrained`` (model weights as safetensors, config, tokenizer).

Saving calls ``data.save_pretrained(path)``; loading calls the function named by ``load_function``
(an import path such as ``rlhf_pipeline.modeling.load_policy``) with the directory. With
``versioned: true`` each save goes to ``<filepath>/<timestamp>/<name>`` like any Kedro dataset. With
``mlflow_artifact_path`` the saved directory is also logged to the active MLflow run (kedro-mlflow's
``MlflowArtifactDataset`` wrapper would do this, but it gives a versioned inner dataset its own save
version, which kedro 1.x's catalog rejects).
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
from kedro.io import AbstractVersionedDataset, Version
from kedro.io.core import VersionNotFoundError


def _import(path: str):
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"load_function must be a dotted import path, got {path!r}")
    return getattr(importlib.import_module(module), name)


class PretrainedDirDataset(AbstractVersionedDataset[Any, Any]):
    """``filepath``: the directory; ``load_function``: dotted path of ``f(directory) -> object``."""

    def __init__(
        self,
        filepath: str,
        load_function: str,
        load_args: dict[str, Any] | None = None,
        version: Version | None = None,
        mlflow_artifact_path: str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__(filepath=PurePosixPath(filepath), version=version, exists_function=self._dir_exists)
        self._mlflow_artifact_path = mlflow_artifact_path
        self._load_function = load_function
        self._load_args = load_args or {}
        self.metadata = metadata

    @staticmethod
    def _dir_exists(path: str) -> bool:
        return Path(path).is_dir()

    def load(self) -> Any:
        return _import(self._load_function)(str(self._get_load_path()), **self._load_args)

    def save(self, data: Any) -> None:
        path = Path(self._get_save_path())
        if path.exists() and not self._version:
            shutil.rmtree(path)  # an unversioned directory holds only the latest save
        path.mkdir(parents=True, exist_ok=True)
        data.save_pretrained(str(path))
        if self._mlflow_artifact_path and mlflow.active_run() is not None:
            mlflow.log_artifacts(str(path), self._mlflow_artifact_path)

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except VersionNotFoundError:  # no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "load_function": self._load_function, "version": self._version}
