"""The studies (``settings.STUDIES``): grids of PPO runs over rows and seeds, evaluated against SFT, summarised
with intervals (the tuning grid, the paper's §5 ablation, the long run)."""

from rlhf_pipeline.pipelines.studies.pipeline import create_pipeline

__all__ = ["create_pipeline"]
