"""Wiring of the data_processing pipeline. ``raw_preferences`` is whatever the environment's catalog names (the
embedded task, local JSON-lines files, a hub dataset). The split reads the PPO presets too: a ``ppo_prompts``
split smaller than a rollout buffer fails here, before any stage trains."""

from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.data import SPLITS
from rlhf_pipeline.pipelines.data_processing.nodes import parse_preferences, split_preferences


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                parse_preferences,
                ["raw_preferences", "params:data_processing.strict"],
                ["preferences", "quarantine", "parse_counts"],
                name="parse_preferences_node",
            ),
            node(
                split_preferences,
                ["preferences", "params:data_processing.split", "params:ppo", "params:launcher"],
                {name: name for name in (*SPLITS, "split_sizes")},
                name="split_preferences_node",
            ),
        ]
    )
