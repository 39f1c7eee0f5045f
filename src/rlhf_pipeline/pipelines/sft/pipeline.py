"""Wiring of the sft pipeline."""

from kedro.pipeline import Pipeline, node

from rlhf_pipeline.pipelines import bound
from rlhf_pipeline.pipelines.sft.nodes import prepare_base_model, train_sft_model
from rlhf_pipeline.pipelines.tracking import as_metrics


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(prepare_base_model, ["sft_train", "rm_train", "params:model"], "base_model", name="prepare_base_model_node"),
        node(train_sft_model, ["base_model", "sft_train", "params:sft", "params:launcher"], ["sft_model", "sft_metrics"],
             name="train_sft_model_node"),
        node(bound(as_metrics, prefix="sft"), "sft_metrics", "sft_mlflow_metrics",
             name="sft_mlflow_metrics_node"),
    ])
