"""One (row, seed) result of a study, stored as JSON; not stored yet loads as ``None``."""

from __future__ import annotations

from typing import Any

from kedro_datasets.json import JSONDataset


class StoredResultDataset(JSONDataset):
    """kedro-datasets' ``json.JSONDataset`` (``filepath``, indented one space) whose ``load`` returns ``None`` when
    the file does not exist: a (row, seed) not run yet. The study's summary names such runs instead of failing, so
    part of a grid can be run (``--namespaces``) and summarised; ``exists()`` stays false for them, so
    ``--only-missing-outputs`` still runs them."""

    def __init__(self, *, filepath: str, **kwargs: Any) -> None:
        super().__init__(filepath=filepath, save_args={"indent": 1}, **kwargs)

    def load(self) -> Any:
        return super().load() if self._exists() else None
