"""The embedded task's preference pairs, generated from its settings on load and kept as a JSON-lines file.

``load`` writes ``filepath`` (HH-RLHF format, one pair a line) only when it is missing or was written from
other settings - the settings it was written from sit beside it in ``<filepath>.task.json`` - and returns the
file's rows read back as line-numbered ``hh.RawRow``s, so a validation error names the file and line like any
other source. Only an environment whose ``raw_preferences`` is this dataset generates the file, and only when
a run loads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from rlhf_pipeline.datasets.raw_rows import RawRowsDataset
from rlhf_pipeline.hh import RawRow
from rlhf_pipeline.task import TaskConfig, generate_preference_rows


class EmbeddedTaskDataset(AbstractDataset[Any, list[RawRow]]):
    """``filepath``: the ``.jsonl`` file to keep the pairs in; ``task``: ``TaskConfig`` fields (size, seed,
    label noise, annotator bias), validated here, when the catalog builds the dataset."""

    def __init__(self, filepath: str, task: dict[str, Any], metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self._file = RawRowsDataset(filepath)
        self._settings_path = self._filepath.with_name(self._filepath.name + ".task.json")
        self._task = TaskConfig(**task)
        self.metadata = metadata

    def load(self) -> list[RawRow]:
        settings = asdict(self._task)
        if not self._is_up_to_date(settings):
            self._write(settings)
        return self._file.load()

    def save(self, data: Any) -> None:
        raise DatasetError(f"{self._filepath} is generated from `task` on load; it cannot be saved")

    def _is_up_to_date(self, settings: dict[str, Any]) -> bool:
        if not (self._filepath.exists() and self._settings_path.exists()):
            return False
        return json.loads(self._settings_path.read_text()) == settings

    def _write(self, settings: dict[str, Any]) -> None:
        # the record is removed before the write and restored after it: a write cut short leaves no record
        # vouching for a half-written file
        self._settings_path.unlink(missing_ok=True)
        self._file.save(generate_preference_rows(self._task))
        self._settings_path.write_text(json.dumps(settings, indent=2) + "\n")

    def _exists(self) -> bool:
        return True  # generated on load whenever it is missing

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "task": asdict(self._task)}
