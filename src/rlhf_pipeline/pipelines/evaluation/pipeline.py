"""Wiring of the evaluation pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from rlhf_pipeline.pipelines.evaluation.nodes import (
    evaluate_policies,
    plot_comparison,
    plot_training_curves,
    summary_markdown,
    train_judge_model,
)
from rlhf_pipeline.pipelines.ppo.pipeline import VARIANTS


def create_pipeline(**kwargs) -> Pipeline:
    policies = {variant: f"ppo.{variant}.policy" for variant in VARIANTS}
    histories = {variant: f"ppo.{variant}.history" for variant in VARIANTS}
    return pipeline([
        node(train_judge_model, ["sft_model", "judge_train", "rm_val", "params:evaluation.judge"],
             ["judge_model", "judge_metrics"], name="train_judge_model_node"),
        node(evaluate_policies,
             {"eval_prompts": "eval_prompts", "sft_model": "sft_model", "reward_model": "reward_model",
              "judge_model": "judge_model", "evaluation": "params:evaluation", **policies},
             ["evaluation_summary", "evaluation_table", "evaluation_samples"], name="evaluate_policies_node"),
        node(summary_markdown, "evaluation_table", "evaluation_markdown", name="summary_markdown_node"),
        node(plot_training_curves, histories, "training_curves_plot", name="plot_training_curves_node"),
        node(plot_comparison, "evaluation_table", "comparison_plot", name="plot_comparison_node"),
    ])
