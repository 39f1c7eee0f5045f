"""sft: build or load the base model, then supervised fine-tuning on the demonstrations."""

from rlhf_pipeline.pipelines.sft.pipeline import create_pipeline

__all__ = ["create_pipeline"]
