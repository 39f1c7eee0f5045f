"""Nodes of the ablation study around the ppo and evaluation pipelines' own nodes: a grid row's settings (a PPO
preset with the row's overrides), its stored result, and the study's summary. The core is imported inside them:
building the pipelines imports no torch."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.config import digest
from rlhf_pipeline.pipelines.tracking import as_metrics

if TYPE_CHECKING:

    from rlhf_pipeline.launch import PPOSettings

logger = logging.getLogger(__name__)
KEYS = {"base", "iterations", "level", "bootstrap_resamples", "evaluation", "variants"}


def row_parameters(ppo: dict[str, Any], ablation: dict[str, Any], row: str, seed: int) -> dict[str, Any]:
    """A grid row's PPO parameters: its preset (``ablation.base`` unless the row names ``preset``) with the row's
    overrides (``ablation.variants.<row>``), the study's budget (``iterations``), every rollout kept for the gold
    curve, and ``seed``. Raises ``ValueError`` naming an unknown study key, row or preset."""
    from rlhf_pipeline.rl.config import PPOConfig
    from rlhf_pipeline.training.engine import deep_merge

    if unknown := set(ablation) - KEYS:
        raise ValueError(f"ablation: unknown key(s) {sorted(unknown)}; valid: {sorted(KEYS)} (the rows and seeds are "
                         "declared in settings.py: DYNAMIC_PIPELINES_MAPPING['ablation'], ABLATION_SEEDS)")
    if row not in ablation["variants"]:
        raise ValueError(f"ablation.variants: no row {row!r} (declared in settings.py); defined: {sorted(ablation['variants'])}")
    overrides = dict(ablation["variants"][row] or {})
    preset = overrides.pop("preset", ablation["base"])
    if preset not in ppo:
        raise ValueError(f"ablation.variants.{row}.preset: {preset!r} is not a preset of params:ppo; valid: {sorted(ppo)}")
    params = deep_merge(ppo[preset], overrides)
    if ablation.get("iterations"):
        params["iterations"] = ablation["iterations"]
    return {**params, "seed": seed, "sample_every": 1, "sample_count": params.get("rollout_batch_size", PPOConfig.rollout_batch_size)}


def row_settings(ppo: dict[str, Any], ablation: dict[str, Any], launcher: dict[str, Any], previous: Any = None, *,
                 row: str, seed: int) -> PPOSettings:
    """The (row, seed)'s typed settings, named ``ablation/<row>/seed_<seed>`` in metrics; its work folders
    (checkpoints, job) are ``<work_dir>/ablation/<row>/seed_<seed>/<hash of its parameters>``, so a resumed run
    only resumes into the same settings. ``previous`` (the stored result of the (row, seed) before it) goes
    unused: as an input it makes the study run one (row, seed) to its stored result before the next trains,
    so one policy is in memory at a time and a killed study keeps every result it finished."""
    from rlhf_pipeline.launch import PPOSettings

    params = row_parameters(ppo, ablation, row, seed)
    return PPOSettings.from_params(params, launcher, f"ablation/{row}/seed_{seed}",
                                   folder=f"ablation/{row}/seed_{seed}/{digest(params)}")


def settings_key(settings: PPOSettings, sft_scores: dict[str, list], evaluation: dict[str, Any],
                 ablation: dict[str, Any]) -> str:
    """What a (row, seed)'s result depends on, hashed: its trainer and PPO settings, SFT's samples (the SFT model
    and RM), the study's evaluation and its interval settings."""
    return digest([settings.trainer, asdict(settings.train), sft_scores, evaluation, ablation.get("evaluation"),
                   ablation["bootstrap_resamples"], ablation["level"]])


def row_result(settings: PPOSettings, history: pd.DataFrame, samples: list[dict], scores: dict[str, list],
               metrics: dict[str, Any], sft_scores: dict[str, list], evaluation: dict[str, Any],
               ablation: dict[str, Any], *, row: str, seed: int) -> dict[str, Any]:
    """One (row, seed)'s stored result: ``evaluation.seed_result`` of its training and evaluation (intervals by
    ``ablation.bootstrap_resamples`` and ``level``), with ``variant``, ``seed``, ``stopped_early`` and ``key``."""
    from rlhf_pipeline.evaluation import seed_result

    result = seed_result(history, samples, scores, sft_scores, metrics, ablation["bootstrap_resamples"], seed,
                         ablation["level"])
    return {"variant": row, "seed": seed, "key": settings_key(settings, sft_scores, evaluation, ablation),
            "stopped_early": bool(len(history) < settings.train.iterations), **result}


def summarise_ablation(ablation: dict[str, Any], evaluation: dict[str, Any], sft_scores: dict[str, list],
                       sft_metrics: dict[str, Any], **outputs: Any) -> dict[str, Any]:
    """The study's tables and figures from every stored (row, seed).

    Args:
        ablation, evaluation: The study's parameters (``base``, ``level``) and the evaluation's.
        sft_scores, sft_metrics: SFT's samples and its own evaluation on the study's prompts.
        **outputs: ``result__<row>__seed_<seed>`` and ``settings__<row>__seed_<seed>`` of every (row, seed).

    Returns:
        ``runs`` and ``curves`` (one row per (row, seed), and per training step), ``summary`` (mean and interval
        per row and metric, the difference from ``ablation.base`` and whether it exceeds its interval), its
        ``markdown``, the ``curves_plot`` and ``gold_plot`` figures, and ``metrics``: each row's means as
        ``ablation/<row>/<metric>`` MLflow metrics (a new run has none yet, so ``--only-missing-outputs``
        reruns this node, and the check below, every time).

    Raises:
        ValueError: A stored result is from other settings than the run's (a rerun with
            ``--only-missing-outputs`` after a change): names the results to delete.
    """
    from rlhf_pipeline import reporting

    results = {key.removeprefix("result__"): value for key, value in outputs.items() if key.startswith("result__")}
    stale = [key.replace("__", ".") for key, result in results.items()
             if result["key"] != settings_key(outputs[f"settings__{key}"], sft_scores, evaluation, ablation)]
    if stale:
        paths = " ".join(f"data/07_model_output/ablation/{s.replace('.', '/')}/result.json" for s in stale)
        raise ValueError(f"stored ablation results from other settings or models: "
                         f"{', '.join(f'ablation.{s}.result' for s in stale)}; to train them again with the run's "
                         f"settings, delete them (with the catalog's paths: rm {paths}) and run again")
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curves", "key")} for r in results.values()])
    curves = pd.DataFrame([{"variant": r["variant"], "seed": r["seed"], **c} for r in results.values() for c in r["curves"]])
    summary = reporting.summary_table(runs, ablation["base"], ablation["level"])
    markdown = reporting.summary_markdown(summary, ablation["base"], ablation["level"])
    logger.info("Ablation study over %d (row, seed) runs:\n%s", len(runs), markdown)
    means = {row["variant"]: {m: row[m] for m in reporting.SUMMARY_METRICS if m in row} for _, row in summary.iterrows()}
    return {"runs": runs, "curves": curves, "summary": summary, "markdown": markdown,
            "curves_plot": reporting.plot_training_curves(curves),
            "gold_plot": reporting.plot_gold(summary, runs, sft_metrics.get("gold_score")),
            "metrics": as_metrics(means, "ablation")}
