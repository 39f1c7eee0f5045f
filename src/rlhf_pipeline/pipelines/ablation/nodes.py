"""Nodes of the ablation study around the ppo and evaluation pipelines' own nodes: a grid row's settings (a PPO
preset with the row's overrides), its result with intervals and curves, and the study's summary. The core is
imported inside them: building the pipelines imports no torch."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.pipelines.tracking import as_metrics

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

    from rlhf_pipeline.launch import PPOSettings

logger = logging.getLogger(__name__)


def row_parameters(ppo: dict[str, Any], ablation: dict[str, Any], row: str, seed: int) -> dict[str, Any]:
    """A grid row's PPO parameters: its preset (``ablation.base`` unless the row names ``preset``) with the row's
    overrides (``ablation.variants.<row>``), the study's budget (``iterations``), every rollout kept for the gold
    curve, and ``seed``. Raises ``ValueError`` naming an unknown row or preset."""
    from rlhf_pipeline.training.engine import deep_merge

    if row not in ablation["variants"]:
        raise ValueError(f"ablation.variants: no row {row!r} (declared in settings.py); defined: {sorted(ablation['variants'])}")
    overrides = dict(ablation["variants"][row] or {})
    preset = overrides.pop("preset", ablation["base"])
    if preset not in ppo:
        raise ValueError(f"ablation.variants.{row}.preset: {preset!r} is not a preset of params:ppo; valid: {sorted(ppo)}")
    params = deep_merge(ppo[preset], overrides)
    if ablation.get("iterations"):
        params["iterations"] = ablation["iterations"]
    return {**params, "name": f"ablation/{row}/seed_{seed}", "seed": seed, "sample_every": 1,
            "sample_count": params.get("rollout_batch_size", 32)}


def settings_key(settings: PPOSettings, evaluation: dict[str, Any], ablation: dict[str, Any]) -> str:
    """What a (row, seed)'s result depends on, hashed: its trainer and PPO settings and the study's evaluation."""
    text = json.dumps([settings.trainer, asdict(settings.train), evaluation, ablation.get("evaluation")],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_settings(ppo: dict[str, Any], ablation: dict[str, Any], launcher: dict[str, Any], *, row: str,
                 seed: int) -> PPOSettings:
    """The (row, seed)'s typed settings; its work folders (checkpoints, job) are ``<work_dir>/ablation/<row>/
    seed_<seed>/<hash of its PPO settings>``, so a resumed run only resumes into the same settings."""
    from rlhf_pipeline.launch import PPOSettings

    params = row_parameters(ppo, ablation, row, seed)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return PPOSettings.from_params(params, launcher, f"ablation/{row}/seed_{seed}/{digest}")


def gold_curve(samples: list[dict]) -> dict[int, float]:
    """Mean gold score of each iteration's kept rollouts (requests the task does not know are left out)."""
    from rlhf_pipeline.task import gold_score

    frame = pd.DataFrame(samples)
    if frame.empty:
        return {}
    frame["gold"] = [gold_score(p, r) for p, r in zip(frame["prompt"], frame["response"], strict=True)]
    return frame.groupby("step")["gold"].mean().dropna().to_dict()


def row_result(settings: PPOSettings, history: pd.DataFrame, samples: list[dict], scores: dict[str, list],
               metrics: dict[str, Any], sft_scores: dict[str, list], evaluation: dict[str, Any],
               ablation: dict[str, Any], *, row: str, seed: int) -> dict[str, Any]:
    """One (row, seed)'s stored result: its evaluation against SFT with per-prompt paired-bootstrap intervals of
    the win rates (``ablation.bootstrap_resamples``, ``ablation.level``), its training curves with the gold score
    of each iteration's rollouts, and ``key`` (``settings_key``)."""
    from rlhf_pipeline.reporting import TRAINING_CURVES, strict_json
    from rlhf_pipeline.stats import paired_bootstrap_win_rate

    result = {"variant": row, "seed": seed, "key": settings_key(settings, evaluation, ablation), **metrics}
    for scorer in ("gold", "rm", "judge"):
        own, base = ([float("nan") if x is None else x for x in s[scorer]] for s in (scores, sft_scores))
        _, low, high = paired_bootstrap_win_rate(own, base, ablation["bootstrap_resamples"], seed, ablation["level"])
        result[f"win_rate_vs_sft_{scorer}_low"], result[f"win_rate_vs_sft_{scorer}_high"] = low, high
    gold = gold_curve(samples)
    result["curves"] = [{"step": int(record["step"]), **{k: record.get(k) for k in TRAINING_CURVES if k != "gold_score"},
                         "gold_score": gold.get(record["step"])} for record in history.to_dict("records")]
    return strict_json(result)


def summarise_ablation(ablation: dict[str, Any], evaluation: dict[str, Any], sft_metrics: dict[str, Any], **outputs: Any,
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str, plt.Figure, plt.Figure, dict]:
    """Every (row, seed) and training step as tables, the study's summary (mean and interval per row and metric,
    differences from ``ablation.base`` and whether they exceed their interval), the same as Markdown, the
    training curves, the final gold scores, and each row's means as MLflow metrics (``ablation/<row>/<metric>``;
    a new run has none yet, so ``--only-missing-outputs`` always reruns this node and its check below).

    Args:
        ablation, evaluation: The study's parameters (``base``, ``level``) and the evaluation's.
        sft_metrics: SFT's own evaluation on the study's prompts (its gold score is the figure's baseline).
        **outputs: ``result__<row>__<seed>`` and ``settings__<row>__<seed>`` of every (row, seed).

    Raises:
        ValueError: A stored result is from other settings than the run's (a rerun with
            ``--only-missing-outputs`` after a change): names the results to delete or rerun.
    """
    from rlhf_pipeline.reporting import (
        SUMMARY_METRICS,
        plot_gold,
        plot_training_curves,
        summary_markdown,
        summary_table,
    )

    results = {key.removeprefix("result__"): value for key, value in outputs.items() if key.startswith("result__")}
    stale = [key.replace("__", ".") for key, result in results.items()
             if result["key"] != settings_key(outputs[f"settings__{key}"], evaluation, ablation)]
    if stale:
        raise ValueError(f"stored ablation results from other settings: {', '.join(f'ablation.{s}.result' for s in stale)}; "
                         "rerun without --only-missing-outputs, or delete those files")
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curves", "key")} for r in results.values()])
    curves = pd.DataFrame([{"variant": r["variant"], "seed": r["seed"], **c} for r in results.values() for c in r["curves"]])
    summary = summary_table(runs, ablation["base"], ablation["level"])
    for _, row in summary.iterrows():
        logger.info("Ablation %s (%d seeds): gold %s, gold win vs SFT %s, KL %s", row["variant"], row["seeds"],
                    row.get("gold_score"), row.get("win_rate_vs_sft_gold"), row.get("kl_to_sft"))
    means = {row["variant"]: {m: row[m] for m in SUMMARY_METRICS if m in row} for _, row in summary.iterrows()}
    return (runs, curves, summary, summary_markdown(summary, ablation["base"], ablation["level"]),
            plot_training_curves(curves), plot_gold(summary, runs, sft_metrics.get("gold_score")),
            as_metrics(means, "ablation"))
