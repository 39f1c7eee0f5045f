"""Dataset preparation shared by the stages: raw sources, de-duplication and prompt-level splits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import pandas as pd

from rlhf_pipeline.hh import RawRow, read_jsonl_rows, records_to_rows

SPLITS = ("sft_train", "rm_train", "rm_val", "ppo_prompts", "eval_prompts", "judge_train")


def load_hub_rows(hub_id: str, split: str, data_dir: str | None = None) -> Iterator[RawRow]:
    """Rows of a Hugging Face dataset (e.g. ``Anthropic/hh-rlhf``) through ``datasets.load_dataset``."""
    import datasets  # imported here: only users of the hub source need it at run time

    dataset = datasets.load_dataset(hub_id, data_dir=data_dir, split=split)
    return records_to_rows(dataset, source=f"hf://{hub_id}/{data_dir or ''}[{split}]")


def raw_rows_from_source(source: Mapping, synthetic_rows: list[RawRow]) -> Iterator[RawRow]:
    """The raw rows that the ``source`` parameters select.

    ``kind: synthetic`` uses the embedded task's file; ``kind: jsonl`` reads ``paths`` (``.jsonl`` or
    ``.jsonl.gz``); ``kind: hub`` loads ``hub_id``/``data_dir`` split ``hub_split`` with ``datasets``.
    """
    kind = source.get("kind", "synthetic")
    if kind == "synthetic":
        yield from synthetic_rows
    elif kind == "jsonl":
        if not source.get("paths"):
            raise ValueError("data_processing.source.paths: list at least one .jsonl/.jsonl.gz file for kind 'jsonl'")
        for path in source["paths"]:
            yield from read_jsonl_rows(path)
    elif kind == "hub":
        yield from load_hub_rows(source["hub_id"], source.get("hub_split", "train"), source.get("data_dir"))
    else:
        raise ValueError(f"data_processing.source.kind: unknown {kind!r}; valid: synthetic, jsonl, hub")


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
