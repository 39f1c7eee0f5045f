"""Nodes of the evaluation pipeline: the judge, the shared prompt set, each policy sampled, scored and compared with
SFT (``policy_evaluation``'s template, reused by the studies), the summary and the champion. The core is
imported inside them: building the pipelines imports no torch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.pipelines.tracking import mlflow_logger
from rlhf_pipeline.reporting import markdown_table, strict_json

if TYPE_CHECKING:
    from rlhf_pipeline.evaluation import EvalSet
    from rlhf_pipeline.modeling import ModelBundle

logger = logging.getLogger(__name__)


def train_judge_model(sft_model: ModelBundle, judge_train: pd.DataFrame, rm_val: pd.DataFrame, judge: dict[str, Any],
                      launcher: dict[str, Any]) -> tuple[ModelBundle, dict[str, float | None]]:
    """The judge: a reward model that PPO never optimised, to measure reward hacking without gold labels, trained
    on ``judge_train`` (pairs disjoint from ``rm_train``: Gao et al. 2022's proxy-vs-gold protocol) from the SFT
    model and measured on ``rm_val``, like the RM (``judge``: ``RewardModelSettings`` parameters; ``launcher``:
    the run's). To use a judge trained elsewhere, point the catalog's ``judge_model`` at it and run the evaluation
    from ``evaluation_set_node``."""
    from rlhf_pipeline.launch.reward import RewardModelSettings, fit_reward_model

    settings = RewardModelSettings.from_params(judge, "evaluation.judge", launcher)
    return fit_reward_model(sft_model, judge_train, rm_val, settings, mlflow_logger("judge"), "judge")


def evaluation_set(eval_prompts: pd.DataFrame, sft_model: ModelBundle, evaluation: dict[str, Any],
                   overrides: dict[str, Any] | None = None) -> EvalSet:
    """The held-out prompts every policy answers, tokenized once (``evaluation.EvalSet.of``); ``overrides``: keys
    over ``evaluation`` (a study's own, e.g. fewer prompts). Raises ``ValueError`` for an empty prompt split."""
    from rlhf_pipeline.evaluation import EvalSet
    from rlhf_pipeline.training.engine import deep_merge

    if eval_prompts.empty:
        raise ValueError("no prompts to evaluate on: the prompt split is empty (for the tuning study: "
                         "data_processing.split.fractions.tune_prompts, or a raw_tune_prompts source)")

    return EvalSet.of(eval_prompts, sft_model, deep_merge(evaluation, overrides or {}))


def sample_and_score(policy: ModelBundle, eval_set: EvalSet, reward_model: ModelBundle,
                     judge_model: ModelBundle) -> dict[str, list]:
    """One policy's responses and their gold, RM and judge scores (``evaluation.sample_and_score``; NaN as null)."""
    from rlhf_pipeline.evaluation import sample_and_score as score

    return strict_json(score(policy, eval_set, reward_model, judge_model))


def compare_with_sft(policy: ModelBundle, scores: dict[str, list], sft_scores: dict[str, list], sft_model: ModelBundle,
                     eval_set: EvalSet) -> dict[str, float | None]:
    """The policy's metrics against SFT's on the same prompts (``evaluation.compare_with_sft``)."""
    from rlhf_pipeline.evaluation import compare_with_sft as compare

    return compare(policy, scores, sft_scores, sft_model, eval_set)


def summarise_evaluation(eval_set: EvalSet, **outputs: Any) -> dict[str, Any]:
    """The comparison of every policy.

    Args:
        eval_set: The prompts every policy answered.
        **outputs: ``metrics__<policy>`` and ``scores__<policy>`` of each policy (SFT first), and
            ``history__<variant>`` of each PPO variant.

    Returns:
        ``summary`` (policy -> metrics; ``null`` where a value does not exist), the same as a ``table`` and as
        ``markdown``, ``samples`` (every sampled response with its scores), ``comparison_plot`` (bars) and
        ``training_curves_plot``.
    """
    from rlhf_pipeline.evaluation import samples_table
    from rlhf_pipeline.reporting import plot_comparison, plot_training_curves

    def of(kind: str) -> dict[str, Any]:
        return {key.split("__", 1)[1]: value for key, value in outputs.items() if key.startswith(f"{kind}__")}

    summary = of("metrics")
    for name, row in summary.items():
        logger.info("%s: gold %s, RM %s, judge %s, win vs SFT (judge) %s, KL %s", name, row.get("gold_score"),
                    row.get("rm_score"), row.get("judge_score"), row.get("win_rate_vs_sft_judge"), row.get("kl_to_sft"))
    table = pd.DataFrame.from_dict(summary, orient="index").rename_axis("policy").reset_index()
    curves = pd.concat([history.assign(variant=name) for name, history in of("history").items()], ignore_index=True)
    return {"summary": summary, "table": table, "samples": samples_table(eval_set, **of("scores")),
            "markdown": markdown_table(table), "comparison_plot": plot_comparison(table),
            "training_curves_plot": plot_training_curves(curves)}


def select_champion(evaluation_summary: dict[str, dict[str, Any]], champion_from: list[str]) -> dict[str, Any]:
    """The PPO policy with the best score, by the first of ``champion_from`` that the summary has (SFT is not a
    candidate): ``{"policy", "by", "value"}``, or ``{}`` when no policy has any of them. The lineage hook gives
    that policy's registered version the MLflow alias ``champion``."""
    candidates = {name: row for name, row in evaluation_summary.items() if name != "sft"}
    for score in champion_from:
        ranked = {name: row[score] for name, row in candidates.items() if isinstance(row.get(score), int | float)}
        if ranked:
            best = max(ranked, key=ranked.get)
            logger.info("Champion: %s by %s %.3f", best, score, ranked[best])
            return {"policy": best, "by": score, "value": ranked[best]}
    return {}
