"""ppo: PPO-max (and the vanilla PPO it is compared with) from the SFT policy against the reward model."""

from rlhf_pipeline.pipelines.ppo.pipeline import create_pipeline

__all__ = ["create_pipeline"]
