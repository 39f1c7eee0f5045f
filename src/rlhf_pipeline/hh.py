"""The canonical HH dialogue (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) and raw, line-numbered rows.

Every stage reads prompts in this one form: ``formats`` turns each data layout into it, ``formatting`` turns it
into token ids. A ``RawRow`` is one undecoded record of a file; a ``RowError`` names its source, line and reason.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# A turn marker: "Human:" / "Assistant:" at the start of the text or after a blank line. Real HH-RLHF
# text starts with "\n\nHuman:" but some rows start with "Human:" or use "\r\n" or single newlines.
TURN_MARKER = re.compile(r"(?:\A\s*|\n\s*\n|\n)(Human|Assistant):[ \t]*")
# A marker inside a turn's text that would start a turn of its own once the text follows another marker.
LINE_MARKER = re.compile(r"\n(Human|Assistant):")


@dataclass(frozen=True)
class RawRow:
    """One record of a raw data file, not yet decoded: a JSON-lines line, or a JSON, CSV or Parquet record (as JSON)."""

    source: str
    line: int  # 1-based
    data: bytes


class RowError(ValueError):
    """A raw row that cannot be read or validated; the message names file, line and reason."""

    def __init__(self, source: str, line: int, reason: str):
        super().__init__(f"{source}:{line}: {reason}")
        self.source, self.line, self.reason = source, line, reason


def split_turns(text: str) -> list[tuple[str, str]]:
    """Split an HH dialogue into ``(speaker, text)`` turns; text before the first marker is an error."""
    text = text.replace("\r\n", "\n")
    markers = list(TURN_MARKER.finditer(text))
    if not markers:
        raise ValueError("no 'Human:'/'Assistant:' turns")
    if text[: markers[0].start()].strip():
        raise ValueError("text before the first 'Human:' turn")
    turns = []
    for marker, following in zip(markers, markers[1:] + [None], strict=True):
        end = following.start() if following else len(text)
        turns.append((marker[1], text[marker.end() : end].strip()))
    return turns


def render_prompt(turns: list[tuple[str, str]]) -> str:
    """Canonical HH prompt of the given turns followed by an open ``Assistant:`` turn."""
    return "".join(f"\n\n{speaker}: {content}" for speaker, content in turns) + "\n\nAssistant:"


COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def open_file(path: Path, mode: str, **kwargs) -> IO:
    """``path`` opened, decompressed by its suffix (``COMPRESSED``); ``kwargs`` as ``open`` takes them."""
    return COMPRESSED.get(path.suffix.lower(), open)(path, mode, **kwargs)


def read_jsonl_rows(path: str | Path) -> Iterator[RawRow]:
    """Raw lines of a JSON-lines file (optionally ``.gz``, ``.bz2``, ``.xz``), 1-based line numbers, bytes left
    undecoded."""
    path = Path(path)
    with open_file(path, "rb") as handle:
        for number, data in enumerate(handle, start=1):
            yield RawRow(str(path), number, data.rstrip(b"\r\n"))


def records_to_rows(records: Iterable[dict], source: str) -> Iterator[RawRow]:
    """Raw rows of already-decoded records (a Hugging Face dataset, a CSV or Parquet file), numbered from 1.

    Text UTF-8 cannot encode (a lone surrogate) is kept as a JSON escape, so that validation, not this reader,
    reports it; values JSON has no type for (timestamps) become their ``str``."""
    for number, record in enumerate(records, start=1):
        try:
            data = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
        except UnicodeEncodeError:
            data = json.dumps(record, default=str).encode("utf-8")
        yield RawRow(source, number, data)
