"""Wiring of the ablation pipeline: one namespace per grid row (``ablation.<variant>``), all from the same SFT
model and RM, and a summary node that reads them all.

The rows come from the run's parameters (``ablation.grid``), so that adding a variant takes a row in YAML and
no code: the hook below records them when Kedro creates the context, which it does before it builds the
pipelines (``kedro run --env test`` thus gets the test grid, and kedro-viz the run's).
"""

from __future__ import annotations

import os
from functools import partial, update_wrapper
from typing import Any

from kedro.config import OmegaConfigLoader
from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.pipelines.ablation.nodes import (
    run_trl_variant,
    run_variant,
    sample_sft,
    summarise_ablation,
)

SHARED_INPUTS = {"sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics", "eval_prompts",
                 "ablation_sft_scores"}
_run_parameters: dict[str, Any] = {}  # the ablation parameters of this process's Kedro context


class AblationGridHook:
    """Hands the run's ``ablation`` parameters to ``create_pipeline`` before Kedro builds the pipelines."""

    @hook_impl
    def after_context_created(self, context) -> None:
        # the raw parameters: ``context.params`` would validate against the pipelines, i.e. build them now
        _run_parameters.clear()
        _run_parameters.update(context.config_loader["parameters"].get("ablation", {}))


def ablation_parameters() -> dict[str, Any]:
    """The run's ``ablation`` parameters; outside a Kedro session, those of ``conf`` (and ``$KEDRO_ENV``)."""
    if _run_parameters:
        return _run_parameters
    from rlhf_pipeline import settings

    loader = OmegaConfigLoader(conf_source="conf", env=os.getenv("KEDRO_ENV"), **settings.CONFIG_LOADER_ARGS)
    return loader["parameters"].get("ablation", {})


def variant_node(name: str, definition: dict[str, Any]):
    """The node of one grid row: this project's PPO trainer, or TRL's for ``trainer: trl``."""
    function = run_trl_variant if definition.get("trainer") == "trl" else run_variant
    bound = update_wrapper(partial(function, variant=name), function)
    return node(bound, ["sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics",
                        "eval_prompts", "ablation_sft_scores", "params:ppo", "params:evaluation", "params:ablation"],
                ["runs", "curves"], name="train_and_evaluate_node")


def create_pipeline(**kwargs) -> Pipeline:
    parameters = ablation_parameters()
    grid = parameters.get("grid", [])
    unknown = [name for name in grid if name not in parameters.get("variants", {})]
    if unknown:
        raise ValueError(f"parameters_ablation.yml: ablation.grid names {unknown}, which ablation.variants does not "
                         f"define; defined: {sorted(parameters.get('variants', {}))}")
    rows = [pipeline([variant_node(name, parameters["variants"][name])], namespace=f"ablation.{name}",
                     inputs=SHARED_INPUTS, parameters={"params:ppo", "params:evaluation", "params:ablation"})
            for name in grid]
    return pipeline([
        node(sample_sft, ["eval_prompts", "sft_model", "reward_model", "params:evaluation", "params:ablation"],
             "ablation_sft_scores", name="ablation_sample_sft_node"),
        *rows,
        node(summarise_ablation,
             {"ablation": "params:ablation", "ablation_sft_scores": "ablation_sft_scores", **{f"{name}_runs": f"ablation.{name}.runs" for name in grid},
              **{f"{name}_curves": f"ablation.{name}.curves" for name in grid}},
             ["ablation_summary", "ablation_markdown", "ablation_curves_plot", "ablation_gold_plot"],
             name="summarise_ablation_node"),
    ])
