"""reward_model: a scalar-head reward model trained from the SFT model on preference pairs."""

from rlhf_pipeline.pipelines.reward_model.pipeline import create_pipeline

__all__ = ["create_pipeline"]
