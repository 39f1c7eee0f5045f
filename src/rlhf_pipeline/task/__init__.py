"""The embedded default task: synthetic HH-RLHF-style dialogues and their programmatic gold reward."""

from rlhf_pipeline.task.generator import TaskConfig, generate_preference_rows
from rlhf_pipeline.task.gold import classify_request, gold_score

__all__ = ["TaskConfig", "classify_request", "generate_preference_rows", "gold_score"]
