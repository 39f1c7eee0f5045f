"""Wiring of the sft pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.pipelines.sft.nodes import prepare_base_model, train_sft_model


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(prepare_base_model, ["sft_train", "rm_train", "params:model"], "base_model", name="prepare_base_model_node"),
            node(train_sft_model, ["base_model", "sft_train", "params:sft"], ["sft_model", "sft_metrics"],
                 name="train_sft_model_node"),
        ]
    )
