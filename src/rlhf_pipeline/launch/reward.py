"""A reward model trained and measured (no kedro): the one function that makes both the RM that PPO optimises and
the evaluation's judge, with the settings both read from parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rlhf_pipeline.config import config_from
from rlhf_pipeline.launch.job import LaunchConfig
from rlhf_pipeline.launch.stages import run_reward_training
from rlhf_pipeline.modeling import VALUE_HEAD_FILE, ModelBundle, ValueHeadModel
from rlhf_pipeline.reporting import strict_json
from rlhf_pipeline.task import gold_score
from rlhf_pipeline.training.engine import LogFn, OptimConfig, no_logging
from rlhf_pipeline.training.reward import RewardConfig, ranking_accuracy, score_responses

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


@dataclass(frozen=True)
class RewardModelSettings:
    """A reward model's parameters (``reward_model``, or the judge's ``evaluation.judge``), typed."""

    train: RewardConfig
    launch: LaunchConfig
    stats_sample: int
    """Training pairs whose two responses are scored for ``reward_mean``/``reward_std`` (where PPO's score
    normaliser starts); all of them when there are fewer."""
    start_from: str | None = None
    """A reward model saved by this project (a ``save_pretrained`` directory with its value head) to start from
    instead of a fresh head on the SFT model; with ``epochs: 0`` it is used as it is (measured, not trained)."""

    @classmethod
    def from_params(cls, params: dict[str, Any], key: str, launcher: dict[str, Any]) -> RewardModelSettings:
        """The settings from the parameters under ``key`` (named in errors, and the job folder's name):
        ``RewardConfig`` fields plus ``stats_sample``, ``start_from`` (optional) and ``launcher`` (this stage's
        keys over the run's ``launcher``, see ``LaunchConfig.from_params``).

        Raises:
            ValueError: ``stats_sample`` below 1 (no score statistics: PPO would fail to normalise scores), or
                an unknown or invalid ``RewardConfig``/``LaunchConfig`` field.
            KeyError: ``stats_sample`` is missing.
        """
        params = dict(params)
        stats_sample = params.pop("stats_sample")
        if not isinstance(stats_sample, int) or stats_sample < 1:
            raise ValueError(f"{key}.stats_sample must be an integer >= 1 (training pairs scored for reward_mean/"
                             f"reward_std, which PPO normalises scores with), got {stats_sample!r}; e.g. 1000")
        start_from = params.pop("start_from", None)
        launch = LaunchConfig.from_params(launcher, params.pop("launcher", None), key.replace(".", "/"))
        train = config_from(RewardConfig, params, optim=OptimConfig)
        if train.epochs < 0 or (train.epochs == 0 and not start_from):
            raise ValueError(f"{key}.epochs must be >= 1, or 0 with {key}.start_from (a reward model to use as it "
                             f"is), got {train.epochs}")
        if start_from and not (Path(start_from) / VALUE_HEAD_FILE).is_file():
            raise ValueError(f"{key}.start_from: {start_from} is not a reward model this project saved (no "
                             f"{VALUE_HEAD_FILE} there)")
        return cls(train, launch, stats_sample, start_from)


def given_reward_model(path: str, sft_model: ModelBundle) -> ValueHeadModel:
    """The reward model saved at ``path`` (``modeling.load_value_model``).

    Raises:
        ValueError: Its prompt format or its tokenizer's vocabulary differs from the SFT model's (PPO scores the
            policy's token ids).
    """
    from rlhf_pipeline.modeling import load_value_model

    given = load_value_model(path)
    if given.prompt_format != sft_model.prompt_format:
        raise ValueError(f"start_from {path}: the reward model reads prompts in the '{given.prompt_format}' format, "
                         f"the SFT model in '{sft_model.prompt_format}' (model.prompt_format); both must match")
    if given.tokenizer.get_vocab() != sft_model.tokenizer.get_vocab():
        raise ValueError(f"start_from {path}: the reward model's tokenizer differs from the SFT model's; PPO scores "
                         f"the policy's token ids, so both must share one tokenizer")
    logger.info("Reward model from %s", path)
    return given.model


def fit_reward_model(sft_model: ModelBundle, train_pairs: pd.DataFrame, val_pairs: pd.DataFrame,
                     settings: RewardModelSettings, log: LogFn = no_logging, log_prefix: str = "reward_model",
                     ) -> tuple[ModelBundle, dict[str, float | None]]:
    """Train a scalar-head RM from the SFT model on ``train_pairs`` and measure it on ``val_pairs``: the reward
    model PPO optimises, and the judge it never sees, are made by this one function.

    Args:
        sft_model: Its LM becomes the RM's backbone under a fresh scalar head.
        train_pairs: ``prompt``, ``chosen``, ``rejected`` pairs the RM trains on.
        val_pairs: Held-out pairs of the same columns, on which it is measured.
        settings: What and where to train.
        log: Receives the training curves as ``<log_prefix>/...``.

    Returns:
        The RM and its metrics: ``val_accuracy``, ``val_margin``, ``gold_agreement`` (accuracy on gold-labelled
            ``val_pairs``), ``label_gold_agreement`` (how often the labels agree with gold), ``reward_mean`` /
            ``reward_std`` over ``stats_sample`` training pairs' responses (PPO normalises scores with them),
            ``length_correlation`` (of score with response length in words) and the pairs dropped to fit the
            context; gold metrics are ``None`` without a gold reward, as JSON ``null``.
    """
    cfg, launch, stats_sample = settings.train, settings.launch, settings.stats_sample
    encoder = sft_model.encoder()
    initial = (given_reward_model(settings.start_from, sft_model) if settings.start_from
               else ValueHeadModel(sft_model.model, seed=cfg.seed))
    model, fit_counts = (initial, {}) if cfg.epochs == 0 else run_reward_training(
        sft_model.with_model(initial), train_pairs, cfg, launch, log, log_prefix)

    def scores(frame: pd.DataFrame, column: str) -> torch.Tensor:
        return score_responses(model, encoder, frame["prompt"].tolist(), frame[column].tolist(), cfg.max_length,
                               cfg.eval_batch_size)

    def fitting_pair_scores(frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected scores of the pairs that fit the context."""
        chosen, rejected = scores(frame, "chosen"), scores(frame, "rejected")
        fits = ~(chosen.isnan() | rejected.isnan())
        return chosen[fits], rejected[fits]

    val_chosen, val_rejected = fitting_pair_scores(val_pairs)
    gold_pairs = gold_ordered(val_pairs)
    gold_chosen, gold_rejected = fitting_pair_scores(gold_pairs) if len(gold_pairs) else (torch.zeros(0), torch.zeros(0))
    sample = train_pairs.sample(n=min(stats_sample, len(train_pairs)), random_state=cfg.seed)
    train_scores = torch.cat([scores(sample, "chosen"), scores(sample, "rejected")])
    lengths = torch.tensor([len(r.split()) for r in pd.concat([sample["chosen"], sample["rejected"]])], dtype=torch.float)
    fits = ~train_scores.isnan()
    train_scores, lengths = train_scores[fits], lengths[fits]
    metrics = {
        "val_accuracy": ranking_accuracy(val_chosen, val_rejected) if len(val_chosen) else None,
        "val_margin": (val_chosen - val_rejected).mean().item() if len(val_chosen) else None,
        "gold_agreement": ranking_accuracy(gold_chosen, gold_rejected) if len(gold_chosen) else None,
        "label_gold_agreement": float(gold_pairs["label_agrees_with_gold"].mean()) if len(gold_pairs) else None,
        "reward_mean": train_scores.mean().item(),
        "reward_std": train_scores.std().item(),
        "length_correlation": torch.corrcoef(torch.stack([train_scores, lengths]))[0, 1].item(),
        "stats_count": float(train_scores.numel()),
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "val_pairs_dropped": len(val_pairs) - len(val_chosen),
        "gold_pairs": len(gold_pairs),
        **fit_counts,
    }
    logger.info("%s: val accuracy %s, gold agreement %s, score mean %.3f std %.3f", log_prefix, metrics["val_accuracy"],
                metrics["gold_agreement"], metrics["reward_mean"], metrics["reward_std"])
    untrained = cfg.epochs == 0  # the given reward model as it is: its origin is the lineage
    return sft_model.with_model(model, settings.start_from if untrained else None), strict_json(metrics)
