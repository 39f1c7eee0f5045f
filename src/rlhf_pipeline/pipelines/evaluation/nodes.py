"""Nodes of the evaluation pipeline."""

from __future__ import annotations

import logging
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and MLflow
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from rlhf_pipeline.evaluation import distinct_n, kl_and_perplexity, win_rate  # noqa: E402
from rlhf_pipeline.generation import SamplingConfig, generate_texts  # noqa: E402
from rlhf_pipeline.modeling import ModelBundle  # noqa: E402
from rlhf_pipeline.pipelines.tracking import mlflow_logger  # noqa: E402
from rlhf_pipeline.task import gold_score  # noqa: E402
from rlhf_pipeline.task.gold import REFUSAL  # noqa: E402
from rlhf_pipeline.training.reward import score_responses  # noqa: E402

logger = logging.getLogger(__name__)
CURVES = ("reward/raw_score", "kl/sequence", "response/perplexity", "response/length")


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def evaluate_policies(
    eval_prompts: pd.DataFrame, sft_model: ModelBundle, reward_model: ModelBundle, evaluation: dict[str, Any],
    **ppo_policies: ModelBundle,
) -> tuple[dict[str, dict[str, float]], pd.DataFrame, pd.DataFrame]:
    """Sample every policy on the held-out prompts with fixed settings and seed, and compare with SFT.

    Args:
        eval_prompts: ``prompt`` and ``category`` of the held-out prompts.
        sft_model: The SFT policy (baseline and KL reference).
        reward_model: Scores responses (the proxy the policies were trained on).
        evaluation: ``sampling``, ``seed``, ``max_length``, ``max_prompts``.
        **ppo_policies: One trained policy per PPO variant, by name.

    Returns:
        The summary (one object per policy), the same as a table, and every sampled response with its scores.
    """
    prompts_frame = eval_prompts.head(evaluation["max_prompts"])
    prompts, categories = prompts_frame["prompt"].tolist(), prompts_frame["category"].tolist()
    sampling, max_length = SamplingConfig(**evaluation["sampling"]), evaluation["max_length"]
    policies = {"sft": sft_model, **ppo_policies}
    samples, per_policy = [], {}
    for name, bundle in policies.items():
        responses = generate_texts(bundle.model, sft_model.tokenizer, prompts, sampling, seed=evaluation["seed"])
        gold = [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]
        rm = score_responses(reward_model.model, sft_model.tokenizer, prompts, responses, max_length).tolist()
        per_policy[name] = {"responses": responses, "gold": gold, "rm": rm}
        samples += [{"policy": name, "prompt": p, "category": c, "response": r, "gold_score": g, "rm_score": s}
                    for p, c, r, g, s in zip(prompts, categories, responses, gold, rm, strict=True)]
    summary = {}
    baseline = per_policy["sft"]
    for name, result in per_policy.items():
        refused = [bool(REFUSAL.search(r)) for r in result["responses"]]
        harmful = [c == "harmful" for c in categories]
        summary[name] = {
            "gold_score": _nanmean(result["gold"]),
            "rm_score": _nanmean(result["rm"]),
            "win_rate_vs_sft_gold": win_rate(result["gold"], baseline["gold"]),
            "win_rate_vs_sft_rm": win_rate(result["rm"], baseline["rm"]),
            **kl_and_perplexity(policies[name].model, sft_model.model, sft_model.tokenizer, prompts, result["responses"], max_length),
            "response_length": sum(len(r.split()) for r in result["responses"]) / len(prompts),
            "distinct_1": distinct_n(result["responses"], 1),
            "distinct_2": distinct_n(result["responses"], 2),
            "refusal_rate_harmful": _nanmean([float(r) for r, h in zip(refused, harmful, strict=True) if h]),
            "refusal_rate_harmless": _nanmean([float(r) for r, h in zip(refused, harmful, strict=True) if not h]),
        }
        logger.info("%s: gold %.3f, RM %.3f, win vs SFT (gold) %.2f, KL %.3f", name, summary[name]["gold_score"],
                    summary[name]["rm_score"], summary[name]["win_rate_vs_sft_gold"], summary[name]["kl_to_sft"])
        mlflow_logger(f"evaluation/{name}")({k: v for k, v in summary[name].items() if not math.isnan(v)}, 0)
    table = pd.DataFrame.from_dict(summary, orient="index").rename_axis("policy").reset_index()
    return summary, table, pd.DataFrame(samples)


def summary_markdown(table: pd.DataFrame) -> str:
    """The comparison table as Markdown."""
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_training_curves(**histories: pd.DataFrame) -> plt.Figure:
    """RM score, KL, perplexity and length per iteration for each PPO variant."""
    figure, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for metric, axis in zip(CURVES, axes, strict=True):
        for name, history in histories.items():
            axis.plot(history["step"], history[metric], label=name)
        axis.set_title(metric)
        axis.set_xlabel("PPO iteration")
    axes[0].legend()
    figure.tight_layout()
    return figure


def plot_comparison(table: pd.DataFrame) -> plt.Figure:
    """Bars of the final comparison: gold score, RM score, KL to SFT and win rate by gold."""
    metrics = ["gold_score", "rm_score", "kl_to_sft", "win_rate_vs_sft_gold"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for metric, axis in zip(metrics, axes, strict=True):
        axis.bar(table["policy"], table[metric], color=["grey", "tab:blue", "tab:orange", "tab:green"][: len(table)])
        axis.set_title(metric)
    figure.tight_layout()
    return figure
