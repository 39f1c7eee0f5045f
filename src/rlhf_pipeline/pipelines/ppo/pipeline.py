"""Wiring of the ppo pipeline: one namespace per preset (``ppo.<variant>``, declared in ``settings.py``), sharing
the SFT model, RM and data. ``training`` is the node the studies instantiate too."""

from kedro.framework.project import settings
from kedro.pipeline import Node, Pipeline, node

from rlhf_pipeline.pipelines import bound
from rlhf_pipeline.pipelines.ppo.nodes import ppo_settings, train_ppo

SHARED_INPUTS = {"sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics"}


def training() -> Node:
    """The PPO training node: ``settings`` (a ``PPOSettings``) and the shared inputs -> policy, history, samples,
    mlflow_metrics."""
    return node(train_ppo, ["sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics", "settings"],
                ["policy", "history", "samples", "mlflow_metrics"], name="train_ppo_node")


def create_pipeline(**kwargs) -> Pipeline:
    return sum((Pipeline([node(bound(ppo_settings, name=variant), ["params:ppo", "params:launcher"], "settings",
                               name="ppo_settings_node"), training()],
                         namespace=f"ppo.{variant}", inputs=SHARED_INPUTS,
                         parameters={"params:ppo": f"params:ppo.{variant}", "params:launcher": "params:launcher"})
                for variant in settings.DYNAMIC_PIPELINES_MAPPING["ppo"]), Pipeline([]))
