"""The canonical HH dialogue (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), what makes one valid, and raw rows.

Every stage reads prompts in this one form: ``formats`` turns each data layout into it, ``formatting`` turns it
into token ids. A ``RawRow`` is one undecoded record of a file; a ``RowError`` names its source, line and reason.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
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


# --- what a valid dialogue is ------------------------------------------------------------------------------------
SERIALISED_MESSAGES = re.compile(r"\s*\[\s*\{\s*[\"'](?:role|from|content|value)[\"']\s*:")
# The end-of-text and turn markers of the common chat models' templates: GPT-2/Qwen/ChatML/Llama-3/Phi ``<|...|>``,
# Llama-2/Mistral, Gemma. In chat data they are export artefacts (a reply that is only "<|im_end|>"), not text.
SPECIAL_TOKEN_TEXT = re.compile(
    r"<\|[A-Za-z0-9_]{1,40}\|>|</s>|<bos>|<eos>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>"
)


def check_text(text: str, where: str) -> None:
    """Raise ``ValueError`` for text a tokenizer cannot take as plain data: a lone surrogate (UTF-8 cannot encode
    it), a control character other than tab and newlines, or special-token text (``SPECIAL_TOKEN_TEXT``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{where}: text cannot be encoded as UTF-8 (lone surrogate "
                         f"{text[err.start]!r} at character {err.start})") from None
    control = next((i for i, c in enumerate(text) if c not in "\t\n\r" and unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise ValueError(f"{where}: control character U+{ord(text[control]):04X} at character {control}")
    special = SPECIAL_TOKEN_TEXT.search(text)
    if special:
        raise ValueError(f"{where}: special-token text {special[0]!r} (a tokenizer would read it as a control token)")


def check_turns(turns: Sequence[tuple[str, str]], where: str) -> None:
    """Raise ``ValueError`` unless the turns start with ``Human``, alternate ``Human``/``Assistant`` and none is empty."""
    if not turns:
        raise ValueError(f"{where}: no turns")
    if turns[0][0] != "Human":
        raise ValueError(f"{where}: the dialogue does not start with a 'Human:' turn")
    for number, ((speaker, text), previous) in enumerate(zip(turns, [None, *turns[:-1]], strict=True), start=1):
        if previous is not None and previous[0] == speaker:
            raise ValueError(f"{where}: turns do not alternate (turns {number - 1} and {number} are both "
                             f"'{speaker}:')")
        if not text.strip():
            raise ValueError(f"{where}: turn {number} ('{speaker}:') is empty")
        check_text(text, where)
        check_no_marker(text, f"{where}: turn {number}")


def check_no_marker(text: str, where: str) -> None:
    """Raise ``ValueError`` for text that holds a ``Human:``/``Assistant:`` turn marker at a line start
    (``hh.LINE_MARKER``): the canonical dialogue would read it as a turn of its own. (A turn that starts with
    ``"Human:"``, as some HH-RLHF rows' ``"Human: Human: ..."`` do, follows its own marker and stays one turn.)"""
    marker = LINE_MARKER.search(text)
    if marker:
        raise ValueError(f"{where} holds a '{marker[1]}:' turn marker at a line start, which would split it into "
                         f"turns")


def check_not_serialised(text: str, where: str) -> None:
    """Raise ``ValueError`` for a message list written out as text (``"[{'role': 'user', ..."``, as a CSV cell holds
    a list): it would train as the literal text of the list."""
    if SERIALISED_MESSAGES.match(text):
        raise ValueError(f"{where} holds a message list written as text (a CSV cell cannot hold a list); store "
                         f"conversational rows as JSON lines, JSON or Parquet")


def hh_prompt_response(text: str, where: str = "dialogue") -> tuple[str, str]:
    """``(canonical prompt, final assistant response)`` of one HH transcript, every turn checked.

    Raises:
        ValueError: The reason, prefixed with ``where``.
    """
    turns, response = hh_dialogue(text, where)
    return render_prompt(turns), response


def hh_dialogue(text: str, where: str) -> tuple[list[tuple[str, str]], str]:
    """Prompt turns and final response of one HH transcript, every turn checked (``ValueError`` with the reason)."""
    turns = split_turns(text)
    if turns[-1][0] != "Assistant":
        raise ValueError(f"{where}: the dialogue does not end with an 'Assistant:' turn")
    if not turns[-1][1]:
        raise ValueError(f"{where}: empty final assistant response")
    check_turns(turns, where)
    return turns[:-1], turns[-1][1]
