"""Kedro datasets that kedro-datasets lacks: the embedded task's generated pairs, raw JSONL lines and
versioned `save_pretrained` directories."""

from rlhf_pipeline.datasets.embedded_task import EmbeddedTaskDataset
from rlhf_pipeline.datasets.raw_rows import RawRowsDataset
from rlhf_pipeline.datasets.pretrained import PretrainedDirDataset

__all__ = ["EmbeddedTaskDataset", "RawRowsDataset", "PretrainedDirDataset"]
