"""evaluation: SFT vs every PPO variant on held-out prompts, by the reward model and the gold reward."""

from rlhf_pipeline.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
