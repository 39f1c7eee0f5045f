"""Wiring of the evaluation pipeline: the judge, then SFT and every PPO preset (``settings.py``) each sampled,
scored and compared with SFT in its own namespace (``evaluation.<policy>``), then the summary and the champion.
``policy_evaluation`` is the template the studies instantiate too."""

from kedro.framework.project import settings
from kedro.pipeline import Node, Pipeline, node

from rlhf_pipeline.pipelines import bound
from rlhf_pipeline.pipelines.evaluation.nodes import (
    compare_with_sft,
    evaluation_set,
    sample_and_score,
    select_champion,
    summarise_evaluation,
    train_judge_model,
)
from rlhf_pipeline.pipelines.tracking import as_metrics

POLICY_INPUTS = {"eval_set", "reward_model", "judge_model", "sft_model"}


def policy_evaluation() -> Pipeline:
    """One policy sampled, scored and compared with SFT: ``policy``, ``eval_set``, ``reward_model``,
    ``judge_model``, ``sft_model`` and ``sft_scores`` -> ``scores``, ``metrics``."""
    return Pipeline([
        node(sample_and_score, ["policy", "eval_set", "reward_model", "judge_model"], "scores",
             name="sample_and_score_node"),
        node(compare_with_sft, ["policy", "scores", "sft_scores", "sft_model", "eval_set"], "metrics",
             name="compare_with_sft_node"),
    ])


def prompt_set(overrides: str | None = None) -> Node:
    """The node that tokenizes the held-out prompts once for every policy: ``eval_prompts``, ``sft_model`` and
    ``params:evaluation`` (with the keys of parameter ``overrides`` over it) -> ``eval_set``."""
    return node(evaluation_set, ["eval_prompts", "sft_model", "params:evaluation", *([overrides] if overrides else [])],
                "eval_set", name="evaluation_set_node")


def create_pipeline(**kwargs) -> Pipeline:
    variants = settings.DYNAMIC_PIPELINES_MAPPING["ppo"]
    policies = {"sft": "sft_model", **{variant: f"ppo.{variant}.policy" for variant in variants}}
    per_policy = [Pipeline(policy_evaluation(), namespace=f"evaluation.{name}",
                           inputs={"policy": dataset, "sft_scores": "evaluation.sft.scores", **{i: i for i in POLICY_INPUTS}})
                  for name, dataset in policies.items()]
    return Pipeline([
        node(train_judge_model, ["sft_model", "judge_train", "rm_val", "params:evaluation.judge", "params:launcher"],
             ["judge_model", "judge_metrics"], name="train_judge_model_node"),
        node(bound(as_metrics, prefix="judge"), "judge_metrics", "judge_mlflow_metrics",
             name="judge_mlflow_metrics_node"),
        prompt_set(),
        *per_policy,
        node(summarise_evaluation,
             {"eval_set": "eval_set", **{f"metrics__{name}": f"evaluation.{name}.metrics" for name in policies},
              **{f"scores__{name}": f"evaluation.{name}.scores" for name in policies},
              **{f"history__{variant}": f"ppo.{variant}.history" for variant in variants}},
             {"summary": "evaluation_summary", "table": "evaluation_table", "samples": "evaluation_samples",
              "markdown": "evaluation_markdown", "comparison_plot": "comparison_plot",
              "training_curves_plot": "training_curves_plot"}, name="summarise_evaluation_node"),
        node(bound(as_metrics, prefix="evaluation"), "evaluation_summary",
             "evaluation_mlflow_metrics", name="evaluation_mlflow_metrics_node"),
        node(select_champion, ["evaluation_summary", "params:evaluation.champion_from"], "champion",
             name="select_champion_node"),
    ])
