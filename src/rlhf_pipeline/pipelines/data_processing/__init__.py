"""data_processing: the environment's ``raw_preferences`` -> validated, prompt-level splits."""

from rlhf_pipeline.pipelines.data_processing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
