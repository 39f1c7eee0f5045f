"""Nodes of the data_processing pipeline: generate the task, parse and validate, split by prompt."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from rlhf_pipeline.data import SPLITS, assign_splits, raw_rows_from_source
from rlhf_pipeline.hh import RawRow, parse_rows
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.task import TaskConfig, classify_request, generate_preference_rows

logger = logging.getLogger(__name__)


def generate_task_data(task: dict[str, Any]) -> list[dict[str, str]]:
    """Write the embedded task's preference pairs in HH-RLHF format.

    Args:
        task: ``TaskConfig`` fields (sizes, seed, label noise, annotator bias).

    Returns:
        Rows ``{"chosen": ..., "rejected": ...}`` for the raw JSONL dataset.
    """
    return list(generate_preference_rows(TaskConfig(**task)))


def parse_preferences(
    synthetic_rows: list[RawRow], source: dict[str, Any], strict: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, float]]]:
    """Parse and validate the raw rows that ``source`` selects.

    Args:
        synthetic_rows: Raw lines of the embedded task's file (used when ``source.kind`` is ``synthetic``).
        source: Where the raw rows come from (see ``data.raw_rows_from_source``).
        strict: Stop at the first bad row (``RowError`` naming file, line, reason) instead of quarantining it.

    Returns:
        Valid pairs (``prompt``, ``chosen``, ``rejected``), quarantined rows with their reason, and row counts.
    """
    result = parse_rows(raw_rows_from_source(source, synthetic_rows), strict=strict)
    if result.quarantine:
        reasons = pd.Series([q["reason"] for q in result.quarantine]).value_counts()
        logger.warning("Quarantined %d bad row(s): %s", len(result.quarantine), reasons.to_dict())
    logger.info("Parsed %d valid preference pair(s)", len(result.preferences))
    valid = pd.DataFrame(result.preference_records(), columns=["prompt", "chosen", "rejected"])
    quarantine = pd.DataFrame(result.quarantine, columns=["source", "line", "reason", "raw"])
    counts = {"rows_valid": len(valid), "rows_quarantined": len(quarantine)}
    return valid, quarantine, {k: {"value": float(v), "step": 0} for k, v in counts.items()}


def split_preferences(
    preferences: pd.DataFrame, split: dict[str, Any], ppo: dict[str, dict[str, Any]]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, dict[str, float]]]:
    """De-duplicate pairs and split them by prompt, so that no prompt crosses two splits.

    Args:
        preferences: Valid pairs from ``parse_preferences``.
        split: ``fractions`` per split name, the ``seed`` of the prompt hashing and ``max_pairs`` (optional: a
            seeded sample of at most this many pairs is split, for a run on a budget).
        ppo: The PPO variants' parameters (``params:ppo``); each one's ``rollout_batch_size`` and
            ``launcher.num_processes`` give the prompts it rolls out per iteration.

    Returns:
        ``sft_train`` (prompt, response = chosen), ``rm_train`` and ``rm_val`` (prompt, chosen, rejected),
        ``ppo_prompts`` and ``eval_prompts`` (unique prompts, with the request category), ``judge_train``
        (pairs for the evaluation's judge reward model, which PPO never sees), and split sizes.

    Raises:
        ValueError: A split is empty, or ``ppo_prompts`` holds fewer prompts than a PPO variant rolls out per
            iteration (its buffers would repeat prompts): here, before any stage trains.
    """
    pairs = preferences.drop_duplicates(["prompt", "chosen", "rejected"], ignore_index=True)
    logger.info("Dropped %d duplicate pair(s)", len(preferences) - len(pairs))
    if split.get("max_pairs") and len(pairs) > split["max_pairs"]:  # a budget run on a sample of a large set
        pairs = pairs.sample(n=split["max_pairs"], random_state=split["seed"]).reset_index(drop=True)
        logger.info("Kept a seeded sample of %d pair(s) (data_processing.split.max_pairs)", len(pairs))
    pairs = pairs.assign(split=assign_splits(pairs["prompt"], split["fractions"], split["seed"]))

    def pairs_of(name: str) -> pd.DataFrame:
        return pairs.loc[pairs["split"] == name, ["prompt", "chosen", "rejected"]].reset_index(drop=True)

    def prompts_of(name: str) -> pd.DataFrame:
        prompts = pairs.loc[pairs["split"] == name, "prompt"].drop_duplicates().reset_index(drop=True)
        return pd.DataFrame({"prompt": prompts, "category": [classify_request(p).category for p in prompts]})

    sft_train = pairs_of("sft_train")[["prompt", "chosen"]].rename(columns={"chosen": "response"})
    outputs = (sft_train, pairs_of("rm_train"), pairs_of("rm_val"), prompts_of("ppo_prompts"), prompts_of("eval_prompts"),
               pairs_of("judge_train"))
    names = SPLITS
    for name, frame in zip(names, outputs, strict=True):
        if frame.empty:
            raise ValueError(f"data_processing.split: split '{name}' is empty; raise its fraction or the data size")
    check_ppo_prompts(len(outputs[3]), split, ppo)
    sizes = {f"{name}_size": {"value": float(len(frame)), "step": 0} for name, frame in zip(names, outputs, strict=True)}
    return (*outputs, sizes)


def check_ppo_prompts(prompts: int, split: dict[str, Any], ppo: dict[str, dict[str, Any]]) -> None:
    """Raise a ``ValueError`` naming the variants whose experience buffer (``rollout_batch_size`` prompts on
    each of ``launcher.num_processes`` ranks per node, a lower bound for multi-node runs) is larger than the
    ``prompts`` of the ``ppo_prompts`` split: PPO would fill each buffer with repeats of the same prompts."""
    short = {}
    for variant, settings in ppo.items():
        processes = (settings.get("launcher") or {}).get("num_processes", 1)
        rollout = settings.get("rollout_batch_size", PPOConfig.rollout_batch_size)
        if rollout * processes > prompts:
            short[variant] = f"ppo.{variant}.rollout_batch_size {rollout} x {processes} process(es)"
    if short:
        raise ValueError(
            f"data_processing.split: split 'ppo_prompts' holds {prompts} prompt(s), fewer than one PPO iteration "
            f"rolls out ({'; '.join(short.values())}), so every buffer would repeat prompts; raise "
            f"data_processing.split.fractions.ppo_prompts (now {split['fractions'].get('ppo_prompts', 0)}) or the "
            f"data (task.num_pairs, data_processing.split.max_pairs), or lower the rollout_batch_size of "
            f"{', '.join(f'ppo.{variant}' for variant in short)}")
