"""The ablation study (the paper's §5): PPO-max with each trick left out in turn, several seeds, intervals."""

from rlhf_pipeline.pipelines.ablation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
