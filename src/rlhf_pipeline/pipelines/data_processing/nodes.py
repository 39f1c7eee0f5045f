"""Nodes of the data_processing pipeline: parse and validate the raw rows the catalog loaded, split by prompt."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from rlhf_pipeline.data import SPLITS, assign_splits, raw_rows
from rlhf_pipeline.hh import parse_rows
from rlhf_pipeline.pipelines.tracking import as_metrics
from rlhf_pipeline.task import classify_request

logger = logging.getLogger(__name__)


def parse_preferences(
    raw_preferences: Any, strict: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, float]]]:
    """Parse and validate the raw rows that the environment's ``raw_preferences`` catalog entry loaded.

    Args:
        raw_preferences: Line-numbered ``RawRow``s (the embedded task's file, local JSON-lines files), a
            ``datasets.Dataset`` or one-split ``DatasetDict`` (the hub), or a ``pandas.DataFrame`` of records.
        strict: Stop at the first bad row (``RowError`` naming file, line, reason) instead of quarantining it.

    Returns:
        Valid pairs (``prompt``, ``chosen``, ``rejected``), quarantined rows with their reason, and row counts.

    Raises:
        ValueError: A ``DatasetDict`` with several splits, or (strict) a bad row.
        TypeError: ``raw_preferences`` is none of the above.
    """
    result = parse_rows(raw_rows(raw_preferences, name="raw_preferences"), strict=strict)
    if result.quarantine:
        reasons = pd.Series([q["reason"] for q in result.quarantine]).value_counts()
        logger.warning("Quarantined %d bad row(s): %s", len(result.quarantine), reasons.to_dict())
    logger.info("Parsed %d valid preference pair(s)", len(result.preferences))
    valid = pd.DataFrame(result.preference_records(), columns=["prompt", "chosen", "rejected"])
    quarantine = pd.DataFrame(result.quarantine, columns=["source", "line", "reason", "raw"])
    counts = {"rows_valid": len(valid), "rows_quarantined": len(quarantine)}
    return valid, quarantine, as_metrics(counts, "data")


def split_preferences(
    preferences: pd.DataFrame, split: dict[str, Any], ppo: dict[str, dict[str, Any]], launcher: dict[str, Any]
) -> dict[str, pd.DataFrame | dict[str, dict[str, float]]]:
    """De-duplicate pairs and split them by prompt, so that no prompt crosses two splits.

    Args:
        preferences: Valid pairs from ``parse_preferences``.
        split: ``fractions`` per split name, the ``seed`` of the prompt hashing and ``max_pairs`` (optional: a
            seeded sample of at most this many pairs is split, for a run on a budget).
        ppo: The PPO variants' parameters (``params:ppo``); each one's ``rollout_batch_size`` and
            ``launcher.num_processes`` (over the run's ``launcher``) give the prompts it rolls out per iteration.
        launcher: The run's ``params:launcher``.

    Returns:
        By name: ``sft_train`` (prompt, response = chosen), ``rm_train`` and ``rm_val`` (prompt, chosen, rejected),
        ``ppo_prompts`` and ``eval_prompts`` (unique prompts, with the request category), ``judge_train``
        (pairs for the evaluation's judge reward model, which PPO never sees), and ``split_sizes``.

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

    outputs = {name: prompts_of(name) if name.endswith("_prompts") else pairs_of(name) for name in SPLITS}
    outputs["sft_train"] = outputs["sft_train"][["prompt", "chosen"]].rename(columns={"chosen": "response"})
    for name, frame in outputs.items():
        if frame.empty:
            raise ValueError(f"data_processing.split: split '{name}' is empty; raise its fraction or the data size")
    check_ppo_prompts(len(outputs["ppo_prompts"]), split, ppo, launcher)
    sizes = as_metrics({f"{name}_size": len(frame) for name, frame in outputs.items()}, "data")
    return {**outputs, "split_sizes": sizes}


def check_ppo_prompts(prompts: int, split: dict[str, Any], ppo: dict[str, dict[str, Any]],
                      launcher: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the variants whose experience buffer (``rollout_batch_size`` prompts on
    each of ``launcher.num_processes`` ranks per node, the variant's own over the run's ``launcher``; a lower
    bound for multi-node runs) is larger than the
    ``prompts`` of the ``ppo_prompts`` split: PPO would fill each buffer with repeats of the same prompts."""
    from rlhf_pipeline.launch import LaunchConfig
    from rlhf_pipeline.rl.config import PPOConfig

    short = {}
    for variant, settings in ppo.items():
        processes = LaunchConfig.from_params(launcher, settings.get("launcher"), f"ppo/{variant}").num_processes
        rollout = settings.get("rollout_batch_size", PPOConfig.rollout_batch_size)
        if rollout * processes > prompts:
            short[variant] = f"ppo.{variant}.rollout_batch_size {rollout} x {processes} process(es)"
    if short:
        raise ValueError(
            f"data_processing.split: split 'ppo_prompts' holds {prompts} prompt(s), fewer than one PPO iteration "
            f"rolls out ({'; '.join(short.values())}), so every buffer would repeat prompts; raise "
            f"data_processing.split.fractions.ppo_prompts (now {split['fractions'].get('ppo_prompts', 0)}) or the "
            f"data (task.num_pairs of the embedded task, data_processing.split.max_pairs), or lower the "
            f"rollout_batch_size of {', '.join(f'ppo.{variant}' for variant in short)}")
