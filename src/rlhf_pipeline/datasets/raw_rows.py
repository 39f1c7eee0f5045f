"""Data files loaded as raw, numbered rows, so that validation can name the bad file and line.

kedro-datasets' JSON readers decode a whole file at once: one broken line or undecodable byte fails the load
without saying where. JSON-lines files (``.jsonl``, ``.jsonl.gz``) are read here line by line, each line left as
bytes (``hh.RawRow``) for ``formats`` to decode and validate. JSON (an array or JSON lines), CSV and Parquet
files, gzipped or not, are read by the ``datasets`` library's ``json``/``csv``/``parquet`` builders, and each
record is numbered from 1 within its file. Saving writes a list of dicts as UTF-8 JSON lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from rlhf_pipeline.hh import COMPRESSED, RawRow, open_file, read_jsonl_rows, records_to_rows

COMPRESSIONS = tuple(COMPRESSED)
BUILDERS = {".jsonl": None, ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def file_kind(path: Path) -> str:
    """The suffix that says how to read ``path`` (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), compression
    aside; ``DatasetError`` for any other."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in BUILDERS:
        raise DatasetError(f"{path}: cannot read a '{''.join(path.suffixes)}' file; give "
                           f"{', '.join(BUILDERS)} (each optionally {', '.join(COMPRESSIONS)})")
    return suffixes[-1]


def read_rows(path: Path) -> Iterator[RawRow]:
    """The rows of one file: JSON lines by line number, other files by record number."""
    builder = BUILDERS[file_kind(path)]
    if builder is None:
        try:
            yield from read_jsonl_rows(path)
        except (OSError, EOFError) as err:  # e.g. a .gz file that is not gzip, or was cut short
            raise DatasetError(f"{path}: cannot be read: {err}") from err
        return
    import datasets  # imported here: JSON-lines sources never need it

    try:
        records = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - any reader failure is reported with the file it came from
        raise DatasetError(f"{path}: the datasets '{builder}' reader failed: {err}") from err
    yield from records_to_rows(records, source=str(path))


class RawRowsDataset(AbstractDataset[list[dict], list[RawRow]]):
    """``filepath``: a local data file or a list of them (loaded in order, each row naming its own file and line;
    saving to a list is a ``DatasetError``). Kinds: see the module docstring. An empty list loads no rows: a stage
    without a source of its own; a given file without rows is a ``DatasetError``."""

    def __init__(self, filepath: str | list[str], metadata: dict[str, Any] | None = None):
        self._filepath = filepath
        self._paths = [Path(filepath)] if isinstance(filepath, str) else [Path(path) for path in filepath]
        for path in self._paths:
            file_kind(path)  # an unreadable kind fails when the catalog is built, before any node runs
        self.metadata = metadata

    def load(self) -> list[RawRow]:
        """Every file's rows in order; ``DatasetError`` naming a missing file or one without rows."""
        missing = [str(path) for path in self._paths if not path.is_file()]
        if missing:
            raise DatasetError(f"no such file(s): {missing}")
        rows = []
        for path in self._paths:
            read = list(read_rows(path))
            if not any(row.data.strip() for row in read):  # no files at all is "no source"; a given file must not
                raise DatasetError(f"{path}: the file holds no rows")
            rows += read
        return rows

    def save(self, data: Iterable[dict]) -> None:
        """Write ``data`` as UTF-8 JSON lines to the one ``.jsonl``/``.jsonl.gz`` file (``DatasetError`` otherwise)."""
        if not isinstance(self._filepath, str):
            raise DatasetError(f"cannot save to a list of files {self._filepath}; give one filepath")
        path = self._paths[0]
        if file_kind(path) != ".jsonl":
            raise DatasetError(f"{path}: saves JSON lines only (.jsonl or .jsonl.gz)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open_file(path, "wt", encoding="utf-8") as handle:
            for record in data:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _exists(self) -> bool:
        return all(path.exists() for path in self._paths)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
