"""JSON-lines files loaded as raw, line-numbered rows so that validation can name the bad file and line.

kedro-datasets' JSON readers decode the whole file at once: one broken line or undecodable byte fails
the load without saying where. This dataset leaves each line as bytes (``hh.RawRow``) for ``hh`` to
validate, and saves a list of dicts as UTF-8 JSONL (gzip-compressed when the name ends in ``.gz``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from rlhf_pipeline.hh import RawRow, read_jsonl_rows


class JSONLinesDataset(AbstractDataset[list[dict], list[RawRow]]):
    """``filepath``: a local ``.jsonl`` or ``.jsonl.gz`` file, or a list of them (loaded in order, each row
    naming its own file and line; saving to a list is a ``DatasetError``)."""

    def __init__(self, filepath: str | list[str], metadata: dict[str, Any] | None = None):
        self._filepath = filepath
        self._paths = [Path(filepath)] if isinstance(filepath, str) else [Path(path) for path in filepath]
        self.metadata = metadata

    def load(self) -> list[RawRow]:
        return [row for path in self._paths for row in read_jsonl_rows(path)]

    def save(self, data: Iterable[dict]) -> None:
        if not isinstance(self._filepath, str):
            raise DatasetError(f"cannot save to a list of files {self._filepath}; give one filepath")
        path = self._paths[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "wt", encoding="utf-8") as handle:
            for record in data:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _exists(self) -> bool:
        return all(path.exists() for path in self._paths)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
