"""A JSON-lines file loaded as raw, line-numbered rows so that validation can name the bad line.

kedro-datasets' JSON readers decode the whole file at once: one broken line or undecodable byte fails
the load without saying where. This dataset leaves each line as bytes (``hh.RawRow``) for ``hh`` to
validate, and saves a list of dicts as UTF-8 JSONL (gzip-compressed when the name ends in ``.gz``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from rlhf_pipeline.hh import RawRow, read_jsonl_rows


class JSONLinesDataset(AbstractDataset[list[dict], list[RawRow]]):
    """``filepath``: a local ``.jsonl`` or ``.jsonl.gz`` file."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> list[RawRow]:
        return list(read_jsonl_rows(self._filepath))

    def save(self, data: list[dict]) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if self._filepath.suffix == ".gz" else open
        with opener(self._filepath, "wt", encoding="utf-8") as handle:
            for record in data:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
