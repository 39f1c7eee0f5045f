"""Nodes of the reward_model pipeline."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from rlhf_pipeline.config import config_from
from rlhf_pipeline.modeling import ModelBundle, ValueHeadModel
from rlhf_pipeline.pipelines.tracking import mlflow_logger
from rlhf_pipeline.task import gold_score
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.reward import RewardConfig, ranking_accuracy, score_responses, train_reward_model

logger = logging.getLogger(__name__)


def gold_ordered(pairs: pd.DataFrame) -> pd.DataFrame:
    """Pairs re-labelled by the gold reward (noiseless labels); ties and non-task prompts are dropped."""
    gold_chosen = np.array([gold_score(p, r) for p, r in zip(pairs["prompt"], pairs["chosen"], strict=True)])
    gold_rejected = np.array([gold_score(p, r) for p, r in zip(pairs["prompt"], pairs["rejected"], strict=True)])
    keep = ~(np.isnan(gold_chosen) | np.isnan(gold_rejected)) & (gold_chosen != gold_rejected)
    swap = gold_chosen < gold_rejected
    return pd.DataFrame({
        "prompt": pairs["prompt"][keep],
        "chosen": np.where(swap, pairs["rejected"], pairs["chosen"])[keep],
        "rejected": np.where(swap, pairs["chosen"], pairs["rejected"])[keep],
        "label_agrees_with_gold": ~swap[keep],
    })


def train_reward_model_node(
    sft_model: ModelBundle, rm_train: pd.DataFrame, rm_val: pd.DataFrame, reward_model: dict[str, Any]
) -> tuple[ModelBundle, dict[str, float]]:
    """Train the reward model from the SFT model and measure it.

    Args:
        sft_model: The SFT model; its LM becomes the RM's backbone under a fresh scalar head.
        rm_train: Training pairs (``prompt``, ``chosen``, ``rejected``).
        rm_val: Held-out pairs.
        reward_model: ``RewardConfig`` fields plus ``stats_sample`` (responses used for the score statistics).

    Returns:
        The reward model and its metrics: ``val_accuracy``, ``val_margin``, ``gold_agreement`` (accuracy on
        gold-labelled rm_val pairs), ``label_gold_agreement`` (how often the noisy labels agree with gold),
        ``reward_mean``/``reward_std`` over training responses (PPO normalises scores with them) and
        ``length_correlation`` (of score with response length: the annotators' bias the RM picked up).
    """
    params = dict(reward_model)
    stats_sample = params.pop("stats_sample")
    cfg = config_from(RewardConfig, params, optim=OptimConfig)
    log = mlflow_logger("reward_model")
    tokenizer = sft_model.tokenizer
    model = train_reward_model(ValueHeadModel(sft_model.model, seed=cfg.seed), tokenizer, rm_train["prompt"].tolist(),
                               rm_train["chosen"].tolist(), rm_train["rejected"].tolist(), cfg, log)

    def scores(frame: pd.DataFrame, column: str) -> torch.Tensor:
        return score_responses(model, tokenizer, frame["prompt"].tolist(), frame[column].tolist(), cfg.max_length,
                               cfg.eval_batch_size)

    val_chosen, val_rejected = scores(rm_val, "chosen"), scores(rm_val, "rejected")
    gold_pairs = gold_ordered(rm_val)
    sample = rm_train.sample(n=min(stats_sample, len(rm_train)), random_state=cfg.seed)
    train_scores = torch.cat([scores(sample, "chosen"), scores(sample, "rejected")])
    lengths = torch.tensor([len(r.split()) for r in pd.concat([sample["chosen"], sample["rejected"]])], dtype=torch.float)
    metrics = {
        "val_accuracy": ranking_accuracy(val_chosen, val_rejected),
        "val_margin": (val_chosen - val_rejected).mean().item(),
        "gold_agreement": ranking_accuracy(scores(gold_pairs, "chosen"), scores(gold_pairs, "rejected"))
        if len(gold_pairs) else math.nan,
        "label_gold_agreement": float(gold_pairs["label_agrees_with_gold"].mean()) if len(gold_pairs) else math.nan,
        "reward_mean": train_scores.mean().item(),
        "reward_std": train_scores.std().item(),
        "length_correlation": torch.corrcoef(torch.stack([train_scores, lengths]))[0, 1].item(),
        "stats_count": float(train_scores.numel()),
        "val_pairs": len(rm_val),
        "gold_pairs": len(gold_pairs),
    }
    logger.info("Reward model: val accuracy %.3f, gold agreement %.3f, score mean %.3f std %.3f",
                metrics["val_accuracy"], metrics["gold_agreement"], metrics["reward_mean"], metrics["reward_std"])
    log({k: v for k, v in metrics.items() if not math.isnan(v)}, 0)
    return ModelBundle(model, tokenizer), metrics
