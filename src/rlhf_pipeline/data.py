"""Dataset preparation shared by the stages: raw rows of any loaded source read into validated rows (each bad row
quarantined with its reason), and prompt-level splits."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from rlhf_pipeline.formats import (
    FORMATS,
    Demonstration,
    Preference,
    PromptRow,
    SourceFormat,
    apply_columns,
    detect_format,
    parse_record,
)
from rlhf_pipeline.hh import RawRow, RowError, records_to_rows

logger = logging.getLogger(__name__)

SPLITS = ("sft_train", "rm_train", "rm_val", "ppo_prompts", "tune_prompts", "eval_prompts", "judge_train")


def raw_rows(raw: Any, name: str) -> list[RawRow] | Iterator[RawRow]:
    """The raw rows of what a raw-data catalog entry loaded, for ``parse_rows``.

    Args:
        raw: A list of ``RawRow`` (JSON-lines files: each row names its file and line), a ``datasets.Dataset``,
            a ``datasets.DatasetDict`` holding one split, or a ``pandas.DataFrame`` with one record per row.
        name: Source name of records that carry none (a DataFrame, an in-memory ``Dataset``). A hub dataset is
            named by its ``info.dataset_name`` (or builder) and split, e.g. ``hh-rlhf[train]``; records are
            numbered from 1, so an error names ``source:number``.

    Raises:
        ValueError: A ``DatasetDict`` with several splits (the message names them and how to pick one).
        TypeError: Anything else.
    """
    if isinstance(raw, list):
        stray = next((row for row in raw if not isinstance(row, RawRow)), None)
        if stray is not None:
            raise TypeError(f"{name}: a list of raw rows holds a {type(stray).__name__}, not an hh.RawRow")
        return raw
    if isinstance(raw, pd.DataFrame):
        return records_to_rows(raw.to_dict("records"), source=name)
    import datasets  # imported here: JSON-lines sources never need it

    if isinstance(raw, datasets.DatasetDict):
        if len(raw) != 1:
            hint = "train" if "train" in raw else sorted(raw)[0]
            raise ValueError(f"{name}: a DatasetDict with splits {sorted(raw)}; load one split (the catalog "
                             f"entry's dataset_kwargs.split; for raw_preferences from the hub, --params "
                             f"data_processing.sources.preferences.hub_split={hint})")
        [(split, dataset)] = raw.items()
        return dataset_rows(dataset, split, name)
    if isinstance(raw, datasets.Dataset):
        return dataset_rows(raw, raw.split, name)
    raise TypeError(f"{name}: cannot parse a {type(raw).__name__}; expected a list of hh.RawRow, a datasets.Dataset "
                    f"or DatasetDict, or a pandas.DataFrame")


def dataset_rows(dataset: Any, split: str | None, default: str) -> Iterator[RawRow]:
    """Rows of a ``datasets.Dataset``, named ``<info.dataset_name or builder name>[<split>]`` (``default`` for a
    dataset built in memory, which has neither)."""
    source = dataset.info.dataset_name or dataset.info.builder_name or default
    return records_to_rows(dataset, source=f"{source}[{split}]" if split else source)


def prompt_bucket(prompt: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for ``prompt``: the same prompt always lands in one split."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(prompts: pd.Series, fractions: Mapping[str, float], seed: int) -> pd.Series:
    """Split name of each prompt, by cumulative ``fractions`` (keys: ``SPLITS``) over ``prompt_bucket``."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"data_processing.split.fractions: unknown split(s) {sorted(unknown)}; valid: {SPLITS}")
    total = sum(fractions.values())
    if total <= 0 or any(value < 0 for value in fractions.values()):
        raise ValueError(f"data_processing.split.fractions must be non-negative with a positive sum, got {dict(fractions)}")
    edges, cumulative = [], 0.0
    for name in SPLITS:
        cumulative += fractions.get(name, 0.0) / total
        edges.append((cumulative, name))

    def split_of(prompt: str) -> str:
        bucket = prompt_bucket(prompt, seed)
        return next((name for edge, name in edges if bucket < edge), SPLITS[-1])

    return prompts.map(split_of)


def decode(row: RawRow) -> object:
    """The JSON record of one raw line (a UTF-8 byte-order mark, which editors write at a file's start, ignored);
    raises ``RowError`` for bytes that are not UTF-8 or JSON."""
    try:
        text = row.data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise RowError(row.source, row.line, f"undecodable bytes (not UTF-8) at byte {err.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RowError(row.source, row.line, f"broken JSON: {err.msg}, column {err.colno}") from None


@dataclass
class ParseResult:
    """Valid rows plus quarantined ones (``source``, ``line``, ``reason``, ``raw``), and the format read."""

    rows: list[Preference | Demonstration | PromptRow]
    quarantine: list[dict]
    format: str

    def records(self) -> list[dict]:
        """The valid rows as dicts of their fields (``prompt`` and ``chosen``/``rejected`` or ``response``)."""
        return [asdict(row) for row in self.rows]

    def top_reasons(self, count: int = 3) -> list[tuple[str, int]]:
        """The most frequent quarantine reasons (positions as ``N``, the fields a row had left out)."""
        return Counter(re.sub(r"\b(character|byte|column|turns?|message) \d+( and \d+)?", r"\1 N",
                              re.sub(r" \(fields present: .*\)", "", q["reason"]))
                       for q in self.quarantine).most_common(count)


def parse_rows(rows: Iterable[RawRow], source: SourceFormat | None = None, strict: bool = False,
               name: str = "rows") -> ParseResult:
    """Parse raw rows of one source; in strict mode the first bad row raises ``RowError``, otherwise it is
    quarantined with its reason. With ``format: auto`` each file's first row whose fields fit a format decides that
    file's format (logged; ``ParseResult.format`` joins the formats read with ``+``); a row before it whose fields
    fit none is a bad row."""
    source = source or SourceFormat()
    result, by_file = ParseResult([], [], source.format), {}
    for row in rows:
        if not row.data.strip():
            continue  # blank lines (e.g. a trailing newline) carry no row
        try:
            record = decode(row)
            if source.format == "auto" and row.source not in by_file:
                by_file[row.source] = detected(record, source, f"{name} ({row.source})")
                result.format = "+".join(sorted(set(by_file.values())))
            result.rows.append(parse_record(record, source, by_file.get(row.source, source.format)))
        except ValueError as error:  # a RowError from decoding, or the reason a record does not fit
            err = error if isinstance(error, RowError) else RowError(row.source, row.line, str(error))
            if strict:
                raise err from None
            raw = row.data.decode("utf-8", errors="backslashreplace")
            result.quarantine.append({"source": err.source, "line": err.line, "reason": err.reason, "raw": raw})
    return result


def detected(record: object, source: SourceFormat, name: str) -> str:
    """The format of ``source`` read off one record (logged); ``ValueError`` when its fields fit none."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    fields = apply_columns(record, source.columns)
    fmt = detect_format(fields, source.kind)
    if fmt is None:
        raise ValueError(f"cannot tell the format of {source.kind} rows from the fields {sorted(fields)}; set the "
                         f"source's format ({', '.join(FORMATS[1:])}) and, for other field names, its columns")
    logger.info("%s: format '%s' detected from the fields %s", name, fmt, sorted(fields))
    return fmt
