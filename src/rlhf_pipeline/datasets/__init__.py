"""Kedro datasets that kedro-datasets lacks: the embedded task's generated pairs, raw, numbered rows of data files and
versioned `save_pretrained` directories."""

from rlhf_pipeline.datasets.embedded_task import EmbeddedTaskDataset
from rlhf_pipeline.datasets.pretrained import PretrainedDirDataset
from rlhf_pipeline.datasets.raw_rows import RawRowsDataset

__all__ = ["EmbeddedTaskDataset", "RawRowsDataset", "PretrainedDirDataset"]
