"""Kedro datasets that kedro-datasets lacks: raw JSONL lines and versioned `save_pretrained` directories."""

from rlhf_pipeline.datasets.jsonl_lines import JSONLinesDataset
from rlhf_pipeline.datasets.pretrained import PretrainedDirDataset

__all__ = ["JSONLinesDataset", "PretrainedDirDataset"]
