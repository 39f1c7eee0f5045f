"""Parse and validate Anthropic HH-RLHF preference rows (pure functions, line-numbered errors).

One path serves the real data set and the embedded task: a row ``{"chosen": ..., "rejected": ...}``
holds two dialogues that share everything up to the final ``Assistant:`` turn. Each row becomes a
``Preference(prompt, chosen, rejected)`` where ``prompt`` is the canonical dialogue up to and including
the final ``\\n\\nAssistant:`` and the responses are the final assistant turns.

Every problem is a ``RowError`` naming the source file, the line and the reason, so a caller can either
stop (strict mode) or quarantine the row (default mode) - nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

# A turn marker: "Human:" / "Assistant:" at the start of the text or after a blank line. Real HH-RLHF
# text starts with "\n\nHuman:" but some rows start with "Human:" or use "\r\n" or single newlines.
TURN_MARKER = re.compile(r"(?:\A\s*|\n\s*\n|\n)(Human|Assistant):[ \t]*")


@dataclass(frozen=True)
class Preference:
    """One validated preference pair."""

    prompt: str  # canonical dialogue, ends with "\n\nAssistant:"
    chosen: str  # final assistant turn preferred by the annotator, stripped
    rejected: str  # the other final assistant turn, stripped


@dataclass(frozen=True)
class RawRow:
    """One line of a raw JSONL file, not yet decoded."""

    source: str
    line: int  # 1-based
    data: bytes


class RowError(ValueError):
    """A raw row that cannot become a ``Preference``; the message names file, line and reason."""

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


def split_prompt_response(text: str) -> tuple[str, str]:
    """``(prompt, final assistant response)`` of one HH dialogue; raises ``ValueError`` with the reason."""
    turns = split_turns(text)
    speakers = [speaker for speaker, _ in turns]
    if speakers[0] != "Human":
        raise ValueError("dialogue does not start with a 'Human:' turn")
    if speakers[-1] != "Assistant":
        raise ValueError("dialogue does not end with an 'Assistant:' turn")
    return render_prompt(turns[:-1]), turns[-1][1]


def parse_record(record: object, source: str, line: int) -> Preference:
    """Validate one decoded JSON record into a ``Preference`` or raise ``RowError``."""
    if not isinstance(record, dict):
        raise RowError(source, line, f"expected a JSON object, got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if field not in record:
            raise RowError(source, line, f"missing field '{field}'")
        if not isinstance(record[field], str):
            raise RowError(source, line, f"field '{field}' is {type(record[field]).__name__}, not a string")
    dialogues = {}
    for field in ("chosen", "rejected"):
        try:
            dialogues[field] = split_prompt_response(record[field])
        except ValueError as err:
            raise RowError(source, line, f"field '{field}': {err}") from None
    (prompt, chosen), (rejected_prompt, rejected) = dialogues["chosen"], dialogues["rejected"]
    if prompt != rejected_prompt:
        raise RowError(source, line, "'chosen' and 'rejected' differ before the final 'Assistant:' turn")
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise RowError(source, line, f"field '{field}': empty final assistant response")
    if chosen == rejected:
        raise RowError(source, line, "'chosen' and 'rejected' responses are identical")
    return Preference(prompt, chosen, rejected)


def parse_raw_row(row: RawRow) -> Preference:
    """Decode (UTF-8, JSON) and validate one raw line."""
    try:
        text = row.data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowError(row.source, row.line, f"undecodable bytes (not UTF-8) at byte {err.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise RowError(row.source, row.line, f"broken JSON: {err.msg}, column {err.colno}") from None
    return parse_record(record, row.source, row.line)


@dataclass
class ParseResult:
    """Valid pairs plus quarantined rows (``source``, ``line``, ``reason``, ``raw``)."""

    preferences: list[Preference]
    quarantine: list[dict]

    def preference_records(self) -> list[dict]:
        return [asdict(p) for p in self.preferences]


def parse_rows(rows: Iterable[RawRow], strict: bool = False) -> ParseResult:
    """Parse raw rows; in strict mode the first bad row raises, otherwise it is quarantined with its reason."""
    result = ParseResult([], [])
    for row in rows:
        if not row.data.strip():
            continue  # blank lines (e.g. a trailing newline) carry no row
        try:
            result.preferences.append(parse_raw_row(row))
        except RowError as err:
            if strict:
                raise
            raw = row.data.decode("utf-8", errors="backslashreplace")
            result.quarantine.append({"source": err.source, "line": err.line, "reason": err.reason, "raw": raw})
    return result


def read_jsonl_rows(path: str | Path) -> Iterator[RawRow]:
    """Raw lines of a ``.jsonl`` or ``.jsonl.gz`` file, 1-based line numbers, bytes left undecoded."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, data in enumerate(handle, start=1):
            yield RawRow(str(path), number, data.rstrip(b"\r\n"))


def records_to_rows(records: Iterable[dict], source: str) -> Iterator[RawRow]:
    """Raw rows of already-decoded records (e.g. a Hugging Face dataset), numbered from 1."""
    for number, record in enumerate(records, start=1):
        yield RawRow(source, number, json.dumps(record, ensure_ascii=False).encode("utf-8"))
