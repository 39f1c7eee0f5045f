"""Kedro datasets that kedro-datasets lacks: the embedded task's generated pairs, raw, numbered rows of data files,
versioned `save_pretrained` directories and a study's stored results."""

from rlhf_pipeline.datasets.embedded_task import EmbeddedTaskDataset
from rlhf_pipeline.datasets.pretrained import PretrainedDirDataset
from rlhf_pipeline.datasets.raw_rows import RawRowsDataset
from rlhf_pipeline.datasets.stored_result import StoredResultDataset

__all__ = ["EmbeddedTaskDataset", "RawRowsDataset", "PretrainedDirDataset", "StoredResultDataset"]
