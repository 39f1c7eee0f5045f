"""Wiring of the reward_model pipeline."""

from kedro.pipeline import Pipeline, node

from rlhf_pipeline.pipelines import bound
from rlhf_pipeline.pipelines.reward_model.nodes import train_reward_model_node
from rlhf_pipeline.pipelines.tracking import as_metrics


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(train_reward_model_node, ["sft_model", "rm_train", "rm_val", "params:reward_model", "params:launcher"],
             ["reward_model", "reward_model_metrics"], name="train_reward_model_node"),
        node(bound(as_metrics, prefix="reward_model"), "reward_model_metrics",
             "reward_model_mlflow_metrics", name="reward_model_mlflow_metrics_node"),
    ])
