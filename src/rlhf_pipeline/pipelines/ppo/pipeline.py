"""Wiring of the ppo pipeline: one namespaced copy per variant, sharing the SFT model, RM and data."""

from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.pipelines.ppo.nodes import train_ppo

VARIANTS = ("ppo_max", "vanilla")  # presets in conf/base/parameters_ppo.yml
SHARED_INPUTS = {"sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics"}


def create_pipeline(**kwargs) -> Pipeline:
    template = pipeline([
        node(train_ppo, ["sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics", "params:ppo"],
             ["policy", "history", "samples"], name="train_ppo_node"),
    ])
    return sum(
        (pipeline(template, namespace=f"ppo.{variant}", inputs=SHARED_INPUTS,
                  parameters={"params:ppo": f"params:ppo.{variant}"}) for variant in VARIANTS),
        Pipeline([]),
    )
