"""Nodes of the ppo pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd

from rlhf_pipeline.config import config_from
from rlhf_pipeline.launch import LaunchConfig, run_ppo
from rlhf_pipeline.modeling import ModelBundle
from rlhf_pipeline.pipelines.tracking import mlflow_logger
from rlhf_pipeline.rl.config import PPOConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOSettings:
    """One variant's parameters (``params:ppo.<variant>``): the core's ``PPOConfig`` and what the node reads."""

    name: str
    """The variant, in metric names (``ppo/<name>/...``)."""
    checkpoint_dir: str | None
    """Where a run killed mid-way resumes from (the same command)."""
    launch: LaunchConfig
    """Where PPO trains (more than one process: through the ``deepspeed`` launcher)."""
    train: PPOConfig

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PPOSettings:
        """Raises ``ValueError``/``KeyError`` naming an unknown, missing or invalid key."""
        params = dict(params)
        name, checkpoint_dir = params.pop("name"), params.pop("checkpoint_dir", None)
        launch = config_from(LaunchConfig, params.pop("launcher", {}))
        return cls(name, checkpoint_dir, launch, PPOConfig.from_params(params))


def score_prior(reward_model_metrics: dict[str, float]) -> tuple[float, float, float]:
    """(count, mean, std) of the RM's scores on training pairs: where the score normaliser starts."""
    return (float(reward_model_metrics.get("stats_count", 100)), reward_model_metrics["reward_mean"],
            reward_model_metrics["reward_std"])


def train_ppo(
    sft_model: ModelBundle, reward_model: ModelBundle, ppo_prompts: pd.DataFrame, sft_train: pd.DataFrame,
    reward_model_metrics: dict[str, float], ppo: dict[str, Any],
) -> tuple[ModelBundle, pd.DataFrame, list[dict]]:
    """Train the SFT policy against the reward model with one PPO variant.

    Args:
        sft_model: The policy's start and (frozen copy) the KL reference.
        reward_model: Scores rollouts; the critic starts from it when ``critic_from_reward_model``.
        ppo_prompts: Prompts to roll out.
        sft_train: Demonstrations for the PPO-ptx loss.
        reward_model_metrics: ``reward_mean``/``reward_std`` start the score normaliser.
        ppo: ``PPOConfig`` fields plus ``name`` (the variant, used in metric names), ``checkpoint_dir``
            (a run killed mid-way resumes from there with the same command) and ``launcher``
            (``LaunchConfig``: more than one process runs through the ``deepspeed`` launcher).

    Returns:
        The trained policy, the per-iteration metrics and sample responses.
    """
    settings = PPOSettings.from_params(ppo)
    name, checkpoint_dir, launch, cfg = settings.name, settings.checkpoint_dir, settings.launch, settings.train
    result = run_ppo(sft_model, reward_model, ppo_prompts["prompt"].tolist(),
                     (sft_train["prompt"].tolist(), sft_train["response"].tolist()), cfg, launch,
                     checkpoint_dir=checkpoint_dir, score_prior=score_prior(reward_model_metrics),
                     log=mlflow_logger(f"ppo/{name}"))
    mlflow_logger(f"ppo/{name}")({"prompts_dropped": result.prompts_dropped}, 0)
    history = pd.DataFrame(result.history)
    if not history.empty:
        last = history.iloc[-1]
        logger.info("PPO %s: %d iterations, RM score %.3f, KL %.3f, length %.1f", name, len(history),
                    last["reward/raw_score"], last["kl/sequence"], last["response/length"])
    return sft_model.with_model(result.policy), history, result.samples
