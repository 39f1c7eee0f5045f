"""Wiring of the data_processing pipeline. The split reads the PPO presets too: a ``ppo_prompts`` split smaller
than a rollout buffer fails here, before any stage trains."""

from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.pipelines.data_processing.nodes import (
    generate_task_data,
    parse_preferences,
    split_preferences,
)


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(generate_task_data, "params:task", "synthetic_hh", name="generate_task_data_node"),
            node(
                parse_preferences,
                ["synthetic_hh", "params:data_processing.source", "params:data_processing.strict"],
                ["preferences", "quarantine", "parse_counts"],
                name="parse_preferences_node",
            ),
            node(
                split_preferences,
                ["preferences", "params:data_processing.split", "params:ppo"],
                ["sft_train", "rm_train", "rm_val", "ppo_prompts", "eval_prompts", "judge_train", "split_sizes"],
                name="split_preferences_node",
            ),
        ]
    )
