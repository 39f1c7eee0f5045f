"""Nodes of the reward_model pipeline (the core is imported inside them: building the pipelines imports no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.pipelines.tracking import mlflow_logger

if TYPE_CHECKING:
    from rlhf_pipeline.modeling import ModelBundle


def train_reward_model_node(
    sft_model: ModelBundle, rm_train: pd.DataFrame, rm_val: pd.DataFrame, reward_model: dict[str, Any],
    launcher: dict[str, Any],
) -> tuple[ModelBundle, dict[str, float | None]]:
    """Train the reward model that PPO optimises, from the SFT model, and measure it.

    Args:
        sft_model: The SFT model; its LM becomes the RM's backbone under a fresh scalar head.
        rm_train: Training pairs (``prompt``, ``chosen``, ``rejected``).
        rm_val: Held-out pairs.
        reward_model: ``RewardConfig`` fields plus ``stats_sample`` (training pairs scored for the score
            statistics, >= 1) and ``launcher`` (keys over ``launcher``; see ``RewardModelSettings``).
        launcher: The run's ``LaunchConfig`` keys and ``work_dir``.

    Returns:
        The reward model and its metrics (``launch.reward.fit_reward_model``); gold metrics are ``null`` without a
        gold reward.
    """
    from rlhf_pipeline.launch.reward import RewardModelSettings, fit_reward_model

    settings = RewardModelSettings.from_params(reward_model, "reward_model", launcher)
    return fit_reward_model(sft_model, rm_train, rm_val, settings, mlflow_logger("reward_model"), "reward_model")
