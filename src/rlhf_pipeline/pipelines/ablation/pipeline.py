"""Wiring of the ablation study: every grid row × seed (declared in ``settings.py``) is a namespace
``ablation.<row>.seed_<seed>`` holding the ppo pipeline's training node and the evaluation pipeline's policy
evaluation, between the row's settings and its stored result; then one summary reads them all. The pipeline
registry hands the two pipelines' pieces in, so this package imports neither."""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline, node

from rlhf_pipeline.pipelines.ablation.nodes import row_result, row_settings, summarise_ablation

SHARED_INPUTS = {"sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics", "judge_model"}
PARAMETERS = {"params:ppo", "params:ablation", "params:launcher", "params:evaluation"}


def bound(function, **keywords):
    """``function`` with ``keywords`` fixed, keeping its name and docstring (what kedro-viz shows)."""
    return update_wrapper(partial(function, **keywords), function)


def row_pipeline(row: str, seed: int, training: Node, policy_evaluation: Pipeline) -> Pipeline:
    """One (row, seed): settings -> PPO training -> evaluation against SFT -> the stored result."""
    return Pipeline([
        node(bound(row_settings, row=row, seed=seed), ["params:ppo", "params:ablation", "params:launcher"], "settings",
             name="row_settings_node"),
        training,
        Pipeline(policy_evaluation, inputs={"eval_set": "ablation_eval_set", "sft_scores": "ablation.sft.scores",
                                            "reward_model": "reward_model", "judge_model": "judge_model",
                                            "sft_model": "sft_model"}),
        node(bound(row_result, row=row, seed=seed),
             ["settings", "history", "samples", "scores", "metrics", "ablation.sft.scores", "params:evaluation",
              "params:ablation"], "result", name="row_result_node"),
    ], namespace=f"ablation.{row}.seed_{seed}", inputs=SHARED_INPUTS | {"ablation_eval_set", "ablation.sft.scores"},
        parameters=PARAMETERS)


def create_pipeline(training: Node, policy_evaluation: Pipeline, prompt_set: Node, rows: list[str],
                    seeds: list[int]) -> Pipeline:
    """The study over ``rows`` × ``seeds``, from the ppo pipeline's ``training`` node and the evaluation pipeline's
    ``policy_evaluation`` template and ``prompt_set`` node (``eval_set`` with the study's own overrides)."""
    keys = [f"{row}__seed_{seed}" for row in rows for seed in seeds]
    return Pipeline([
        Pipeline([prompt_set], namespace="ablation", inputs={"eval_prompts", "sft_model"},
                 outputs={"eval_set": "ablation_eval_set"}, parameters={"params:evaluation", "params:ablation.evaluation"}),
        Pipeline(policy_evaluation, namespace="ablation.sft",
                 inputs={"policy": "sft_model", "eval_set": "ablation_eval_set", "sft_scores": "ablation.sft.scores",
                         "reward_model": "reward_model", "judge_model": "judge_model", "sft_model": "sft_model"}),
        *(row_pipeline(row, seed, training, policy_evaluation) for row in rows for seed in seeds),
        node(summarise_ablation,
             {"ablation": "params:ablation", "evaluation": "params:evaluation", "sft_metrics": "ablation.sft.metrics",
              **{f"result__{key}": f"ablation.{key.replace('__', '.')}.result" for key in keys},
              **{f"settings__{key}": f"ablation.{key.replace('__', '.')}.settings" for key in keys}},
             ["ablation_runs", "ablation_curves", "ablation_summary", "ablation_markdown", "ablation_curves_plot",
              "ablation_gold_plot", "ablation_mlflow_metrics"], name="summarise_ablation_node"),
    ])
