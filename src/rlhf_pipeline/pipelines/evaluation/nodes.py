"""Nodes of the evaluation pipeline."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and MLflow
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from rlhf_pipeline.evaluation import distinct_n, kl_and_perplexity, win_rate  # noqa: E402
from rlhf_pipeline.generation import SamplingConfig, fit_prompts, generate_texts  # noqa: E402
from rlhf_pipeline.modeling import ModelBundle, load_value_model  # noqa: E402
from rlhf_pipeline.pipelines.reward_model.nodes import fit_reward_model  # noqa: E402
from rlhf_pipeline.pipelines.tracking import mlflow_logger, strict_json  # noqa: E402
from rlhf_pipeline.task import gold_score  # noqa: E402
from rlhf_pipeline.task.gold import REFUSAL  # noqa: E402
from rlhf_pipeline.training.devices import to_rank_device  # noqa: E402
from rlhf_pipeline.training.reward import score_responses  # noqa: E402

logger = logging.getLogger(__name__)
CURVES = ("reward/raw_score", "kl/sequence", "response/perplexity", "response/length")


def _mean(values) -> float | None:
    """Mean of the values that exist (not NaN); ``None`` when none does, e.g. gold scores on real data."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _correlation(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation over the pairs where both exist; ``None`` with fewer than 3 or no spread."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return None
    x, y = torch.tensor(pairs, dtype=torch.float64).T
    if x.std() == 0 or y.std() == 0:
        return None
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


def train_judge_model(sft_model: ModelBundle, judge_train: pd.DataFrame, rm_val: pd.DataFrame,
                      judge: dict[str, Any]) -> tuple[ModelBundle, dict[str, float | None]]:
    """The judge: a reward model that PPO never optimised, to measure reward hacking without gold labels.

    Args:
        sft_model: Backbone of a trained judge (as for the proxy RM).
        judge_train: Preference pairs disjoint from ``rm_train`` (Gao et al. 2022's proxy-vs-gold protocol).
        rm_val: Held-out pairs that measure the judge.
        judge: ``path`` of a saved value-head model to use as it is, or ``null`` to train one with the
            ``RewardConfig`` fields and ``stats_sample`` given here.

    Returns:
        The judge model and its metrics (its accuracy on ``rm_val`` and, on the embedded task, its
        agreement with gold).
    """
    params = dict(judge)
    path = params.pop("path", None)
    if path:
        logger.info("Judge: the reward model saved in %s", path)
        return load_value_model(path), {"path": path}
    return fit_reward_model(sft_model, judge_train, rm_val, params, "judge")


@dataclass
class EvalSet:
    """The held-out prompts that fit the context, tokenized once, with the sampling settings every policy shares."""
    prompts: list[str]
    categories: list[str]
    prompt_ids: list[list[int]]
    sampling: SamplingConfig
    seed: int
    max_length: int
    dropped: int

    @classmethod
    def of(cls, eval_prompts: pd.DataFrame, sft_model: ModelBundle, evaluation: dict[str, Any]) -> EvalSet:
        """``evaluation``: ``sampling``, ``seed``, ``max_length``, ``max_prompts`` (see parameters_evaluation.yml)."""
        head = eval_prompts.head(evaluation["max_prompts"])
        sampling, max_length = SamplingConfig(**evaluation["sampling"]), evaluation["max_length"]
        kept, prompt_ids = fit_prompts(sft_model.encoder(), head["prompt"].tolist(),
                                       max(max_length - sampling.max_new_tokens, 1), sampling.max_new_tokens)
        frame = head.iloc[kept]
        return cls(frame["prompt"].tolist(), frame["category"].tolist(), prompt_ids, sampling, evaluation["seed"],
                   max_length, len(head) - len(kept))


def sample_and_score(policy: torch.nn.Module, sft_model: ModelBundle, reward_model: ModelBundle, eval_set: EvalSet,
                     judge_model: ModelBundle | None = None) -> dict[str, list]:
    """One policy's responses to the evaluation prompts and their gold, RM (and judge) scores, per prompt."""
    for model in (policy, reward_model.model, *([judge_model.model] if judge_model else [])):
        to_rank_device(model)  # an 8B model must not sample or score on the CPU for hours
    responses = generate_texts(policy, sft_model.tokenizer, eval_set.prompt_ids, eval_set.sampling, seed=eval_set.seed)
    prompts = eval_set.prompts
    scores = {"responses": responses, "gold": [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)],
              "rm": score_responses(reward_model.model, reward_model.encoder(), prompts, responses,
                                    eval_set.max_length).tolist()}
    if judge_model is not None:
        scores["judge"] = score_responses(judge_model.model, judge_model.encoder(), prompts, responses,
                                          eval_set.max_length).tolist()
    return scores


def compare_with_sft(policy: torch.nn.Module, scores: dict[str, list], sft_scores: dict[str, list],
                     sft_model: ModelBundle, eval_set: EvalSet) -> dict[str, float | None]:
    """A policy's metrics against SFT's on the same prompts: mean scores, win rates, KL and perplexity, length,
    diversity and refusal rates (``None`` where a value does not exist, e.g. gold scores on real data)."""
    to_rank_device(sft_model.model)  # the KL reference
    categories = eval_set.categories
    refused = [float(bool(REFUSAL.search(r))) for r in scores["responses"]]
    harmful = [c == "harmful" for c in categories]
    harmless = [c not in ("harmful", "unknown") for c in categories]  # requests the task knows to be harmless
    scorers = [s for s in ("gold", "rm", "judge") if s in scores]
    metrics = {
        **{f"{s}_score": _mean(scores[s]) for s in scorers},
        **{f"win_rate_vs_sft_{s}": win_rate(scores[s], sft_scores[s]) for s in scorers},
        **({"judge_gold_correlation": _correlation(scores["judge"], scores["gold"])} if "judge" in scores else {}),
        **kl_and_perplexity(policy, sft_model.model, sft_model.encoder(), eval_set.prompts, scores["responses"],
                            eval_set.max_length, temperature=eval_set.sampling.temperature),
        "response_length": sum(len(r.split()) for r in scores["responses"]) / max(len(eval_set.prompts), 1),
        "distinct_1": distinct_n(scores["responses"], 1),
        "distinct_2": distinct_n(scores["responses"], 2),
        "refusal_rate_harmful": _mean([r for r, h in zip(refused, harmful, strict=True) if h]),
        "refusal_rate_harmless": _mean([r for r, h in zip(refused, harmless, strict=True) if h]),
        "prompts": len(eval_set.prompts),
        "prompts_dropped": eval_set.dropped,
    }
    return strict_json(metrics)


def evaluate_policies(
    eval_prompts: pd.DataFrame, sft_model: ModelBundle, reward_model: ModelBundle, judge_model: ModelBundle,
    evaluation: dict[str, Any], **ppo_policies: ModelBundle,
) -> tuple[dict[str, dict[str, float | None]], pd.DataFrame, pd.DataFrame]:
    """Sample every policy on the held-out prompts with fixed settings and seed, and compare with SFT.

    Args:
        eval_prompts: ``prompt`` and ``category`` of the held-out prompts.
        sft_model: The SFT policy (baseline and KL reference).
        reward_model: Scores responses (the proxy the policies were trained on).
        judge_model: Scores responses too, but no policy was trained on it.
        evaluation: ``sampling``, ``seed``, ``max_length``, ``max_prompts``.
        **ppo_policies: One trained policy per PPO variant, by name.

    Returns:
        The summary (one object per policy; ``null`` where a value does not exist, e.g. gold scores on real
        data), the same as a table, and every sampled response with its scores.
    """
    eval_set = EvalSet.of(eval_prompts, sft_model, evaluation)
    policies = {"sft": sft_model, **ppo_policies}
    per_policy = {name: sample_and_score(bundle.model, sft_model, reward_model, eval_set, judge_model)
                  for name, bundle in policies.items()}
    samples = [{"policy": name, "prompt": p, "category": c, "response": r, "gold_score": g, "rm_score": s,
                "judge_score": j}
               for name, scores in per_policy.items()
               for p, c, r, g, s, j in zip(eval_set.prompts, eval_set.categories, scores["responses"], scores["gold"],
                                           scores["rm"], scores["judge"], strict=True)]
    summary = {}
    for name, scores in per_policy.items():
        summary[name] = compare_with_sft(policies[name].model, scores, per_policy["sft"], sft_model, eval_set)
        logger.info("%s: gold %s, RM %.3f, judge %.3f, win vs SFT (judge) %s, KL %.3f", name, summary[name]["gold_score"],
                    summary[name]["rm_score"], summary[name]["judge_score"], summary[name]["win_rate_vs_sft_judge"],
                    summary[name]["kl_to_sft"])
        mlflow_logger(f"evaluation/{name}")(summary[name], 0)
    table = pd.DataFrame.from_dict(summary, orient="index").rename_axis("policy").reset_index()
    return summary, table, pd.DataFrame(samples)


def summary_markdown(table: pd.DataFrame) -> str:
    """The comparison table as Markdown; a value that does not exist (no gold reward) reads ``n/a``."""
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    for _, row in table.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
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
    """Bars of the final comparison: gold, RM and judge scores, KL to SFT, win rates by gold and by judge."""
    metrics = ["gold_score", "rm_score", "judge_score", "kl_to_sft", "win_rate_vs_sft_gold", "win_rate_vs_sft_judge"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.5 * len(metrics), 3.2))
    for metric, axis in zip(metrics, axes, strict=True):
        values = pd.to_numeric(table[metric], errors="coerce")  # null (no gold reward) draws no bar
        axis.bar(table["policy"], values.fillna(0.0), color=["grey", "tab:blue", "tab:orange", "tab:green"][: len(table)])
        axis.set_title(metric if values.notna().any() else f"{metric} (n/a)")
    figure.tight_layout()
    return figure
