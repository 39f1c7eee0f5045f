"""Nodes of the ppo pipeline (the core is imported inside them: building the pipelines imports no torch)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.pipelines.tracking import as_metrics, mlflow_logger

if TYPE_CHECKING:
    from rlhf_pipeline.launch import PPOSettings
    from rlhf_pipeline.modeling import ModelBundle

logger = logging.getLogger(__name__)


def ppo_settings(ppo: dict[str, Any], launcher: dict[str, Any], *, name: str) -> PPOSettings:
    """Preset ``name``'s typed settings from ``params:ppo.<name>`` and the run's ``params:launcher``
    (``launch.PPOSettings.from_params``; raises ``ValueError`` naming a bad key)."""
    from rlhf_pipeline.launch import PPOSettings

    return PPOSettings.from_params(ppo, launcher, name)


def train_ppo(
    sft_model: ModelBundle, reward_model: ModelBundle, ppo_prompts: pd.DataFrame, sft_train: pd.DataFrame,
    reward_model_metrics: dict[str, float], settings: PPOSettings,
) -> tuple[ModelBundle, pd.DataFrame, list[dict], dict[str, dict[str, float]]]:
    """Train the SFT policy against the reward model with one PPO variant (or the TRL baseline).

    Args:
        sft_model: The policy's start and (frozen copy) the KL reference.
        reward_model: Scores rollouts; the critic starts from it when ``critic_from_reward_model``.
        ppo_prompts: ``prompt`` column: prompts to roll out.
        sft_train: ``prompt``, ``response``: demonstrations for the PPO-ptx loss.
        reward_model_metrics: ``reward_mean``/``reward_std``/``stats_count`` start the score normaliser.
        settings: The variant; its curves go to MLflow as ``ppo/<name>/...`` while it trains.

    Returns:
        The trained policy, the per-iteration metrics, sample responses, and the run's final counts
        (``iterations``, ``stopped_early``, ``prompts_dropped``) as ``ppo/<name>/...`` MLflow metrics.
    """
    from rlhf_pipeline.launch.stages import TRAINERS, score_prior

    train = TRAINERS[settings.trainer]
    log = mlflow_logger(f"ppo/{settings.name}")
    result = train(sft_model, reward_model, ppo_prompts["prompt"].tolist(),
                   (sft_train["prompt"].tolist(), sft_train["response"].tolist()), settings.train, settings.launch,
                   checkpoint_dir=settings.checkpoint_dir, score_prior=score_prior(reward_model_metrics), log=log)
    history = pd.DataFrame(result.history)
    if not history.empty:
        last = history.iloc[-1]
        logger.info("PPO %s: %d iterations, RM score %.3f, KL %.3f", settings.name, len(history),
                    last["reward/raw_score"], last["kl/sequence"])
    counts = {"iterations": len(history), "stopped_early": float(result.stopped_early),
              "prompts_dropped": result.prompts_dropped}
    return sft_model.with_model(result.policy), history, result.samples, as_metrics(counts, f"ppo/{settings.name}")
