"""Dataset preparation shared by the stages: raw rows of any loaded source, and prompt-level splits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd

from rlhf_pipeline.hh import RawRow, records_to_rows

SPLITS = ("sft_train", "rm_train", "rm_val", "ppo_prompts", "eval_prompts", "judge_train")


def raw_rows(raw: Any, name: str) -> list[RawRow] | Iterator[RawRow]:
    """The raw rows of what a raw-data catalog entry loaded, for ``formats.parse_rows``.

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
