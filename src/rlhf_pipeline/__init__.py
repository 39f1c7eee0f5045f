"""rlhf-pipeline."""
