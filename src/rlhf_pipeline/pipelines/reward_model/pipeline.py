"""Wiring of the reward_model pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.pipelines.reward_model.nodes import train_reward_model_node


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(train_reward_model_node, ["sft_model", "rm_train", "rm_val", "params:reward_model"],
                 ["reward_model", "reward_model_metrics"], name="train_reward_model_node"),
        ]
    )
