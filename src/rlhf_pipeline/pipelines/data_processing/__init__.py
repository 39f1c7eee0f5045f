"""data_processing: the embedded task's raw file (or real HH-RLHF data) -> validated, prompt-level splits."""

from rlhf_pipeline.pipelines.data_processing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
