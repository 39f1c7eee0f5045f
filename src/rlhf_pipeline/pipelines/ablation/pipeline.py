"""Wiring of the ablation study: every grid row × seed (declared in ``settings.py``) is a namespace
``ablation.<row>.seed_<seed>`` holding the ppo pipeline's training node and the evaluation pipeline's policy
evaluation, between the row's settings and its stored result; one (row, seed) finishes before the next starts,
and one summary reads them all. The pipeline registry hands the two pipelines' pieces in, so this package
imports neither."""

from kedro.pipeline import Node, Pipeline, node

from rlhf_pipeline.pipelines import bound
from rlhf_pipeline.pipelines.ablation.nodes import row_result, row_settings, summarise_ablation

SHARED_INPUTS = {"sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics", "judge_model",
                 "ablation_eval_set", "ablation.sft.scores"}
PARAMETERS = {"params:ppo", "params:ablation", "params:launcher", "params:evaluation"}
EVALUATION_INPUTS = {"eval_set": "ablation_eval_set", "sft_scores": "ablation.sft.scores", "reward_model": "reward_model",
                     "judge_model": "judge_model", "sft_model": "sft_model"}


def row_pipeline(row: str, seed: int, training: Node, policy_evaluation: Pipeline, previous: str | None) -> Pipeline:
    """One (row, seed): settings -> PPO training -> evaluation against SFT -> the stored result; after
    ``previous`` (the stored result of the (row, seed) before it) when given."""
    return Pipeline([
        node(bound(row_settings, row=row, seed=seed),
             ["params:ppo", "params:ablation", "params:launcher", *([previous] if previous else [])], "settings",
             name="row_settings_node"),
        training,
        Pipeline(policy_evaluation, inputs=EVALUATION_INPUTS),
        node(bound(row_result, row=row, seed=seed),
             ["settings", "history", "samples", "scores", "metrics", "ablation.sft.scores", "params:evaluation",
              "params:ablation"], "result", name="row_result_node"),
    ], namespace=f"ablation.{row}.seed_{seed}", inputs=SHARED_INPUTS | ({previous} if previous else set()),
        parameters=PARAMETERS)


def create_pipeline(training: Node, policy_evaluation: Pipeline, prompt_set: Node, rows: list[str],
                    seeds: list[int]) -> Pipeline:
    """The study over ``rows`` × ``seeds``, from the ppo pipeline's ``training`` node and the evaluation pipeline's
    ``policy_evaluation`` template and ``prompt_set`` node (``eval_set`` with the study's own overrides)."""
    keys = [f"{row}.seed_{seed}" for row in rows for seed in seeds]
    results = [f"ablation.{key}.result" for key in keys]
    return Pipeline([
        Pipeline([prompt_set], namespace="ablation", inputs={"eval_prompts", "sft_model"},
                 outputs={"eval_set": "ablation_eval_set"}, parameters={"params:evaluation", "params:ablation.evaluation"}),
        Pipeline(policy_evaluation, namespace="ablation.sft", inputs={"policy": "sft_model", **EVALUATION_INPUTS}),
        *(row_pipeline(row, seed, training, policy_evaluation, previous)
          for (row, seed), previous in zip([(r, s) for r in rows for s in seeds], [None, *results[:-1]], strict=True)),
        node(summarise_ablation,
             {"ablation": "params:ablation", "evaluation": "params:evaluation", "sft_scores": "ablation.sft.scores",
              "sft_metrics": "ablation.sft.metrics",
              **{f"result__{key.replace('.', '__')}": f"ablation.{key}.result" for key in keys},
              **{f"settings__{key.replace('.', '__')}": f"ablation.{key}.settings" for key in keys}},
             {"runs": "ablation_runs", "curves": "ablation_curves", "summary": "ablation_summary",
              "markdown": "ablation_markdown", "curves_plot": "ablation_curves_plot", "gold_plot": "ablation_gold_plot",
              "metrics": "ablation_mlflow_metrics"}, name="summarise_ablation_node"),
    ])
