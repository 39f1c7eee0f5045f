"""Wiring of the data_processing pipeline. ``raw_preferences`` (and a stage's own ``raw_sft_train``,
``raw_ppo_prompts``, ``raw_tune_prompts``, ``raw_eval_prompts``) are whatever the environment's catalog names (the embedded task, local
files, a hub dataset). The split reads the PPO presets too: a ``ppo_prompts``
split smaller than a rollout buffer fails here, before any stage trains."""

from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.data import SPLITS
from rlhf_pipeline.pipelines.data_processing.nodes import SOURCES, parse_sources, split_preferences


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                parse_sources,
                {"data_processing": "params:data_processing", **{entry: entry for entry, _ in SOURCES.values()}},
                {name: name for name in ("preferences", "stage_rows", "quarantine", "source_formats", "parse_counts")},
                name="parse_sources_node",
            ),
            node(
                split_preferences,
                ["preferences", "stage_rows", "params:data_processing.split", "params:ppo", "params:launcher"],
                {name: name for name in (*SPLITS, "split_sizes")},
                name="split_preferences_node",
            ),
        ]
    )
