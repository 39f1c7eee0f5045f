"""Wiring of a study (the ablation, the long run, the tuning grid; ``settings.STUDIES``): every row × seed is a
namespace ``<study>.<row>.seed_<seed>`` holding the ppo pipeline's training node and the evaluation pipeline's
policy evaluation, between the row's settings and its stored result; one (row, seed) finishes before the next
starts, and one summary reads them all. SFT's evaluation on the study's prompts (stored) is the namespace
``<study>.baseline``.
The pipeline registry hands the two pipelines' pieces in, so this package imports neither.

Part of a grid runs alone: ``kedro run --pipeline <study> --namespaces <study>.baseline,<study>.<row>.seed_<seed>``,
then ``--nodes summarise_<study>_node`` summarises what is stored and names what is missing."""

from kedro.pipeline import Node, Pipeline, node

from rlhf_pipeline.pipelines import bound
from rlhf_pipeline.pipelines.studies.nodes import row_result, row_settings, summarise_study

PARAMETERS = {"params:ppo", "params:launcher", "params:evaluation"}
SHARED_MODELS = {"sft_model", "reward_model", "ppo_prompts", "sft_train", "reward_model_metrics", "judge_model"}


def row_pipeline(study: str, row: str, seed: int, training: Node, policy_evaluation: Pipeline,
                 previous: str | None) -> Pipeline:
    """One (row, seed): settings -> PPO training -> evaluation against SFT -> the stored result; after
    ``previous`` (the stored result of the (row, seed) before it) when given."""
    shared = {"eval_set": f"{study}.baseline.eval_set", "sft_scores": f"{study}.baseline.scores"}
    return Pipeline([
        node(bound(row_settings, study=study, row=row, seed=seed),
             ["params:ppo", f"params:{study}", "params:launcher", *([previous] if previous else [])], "settings",
             name="row_settings_node"),
        training,
        Pipeline(policy_evaluation, inputs={**shared, **{name: name for name in ("reward_model", "judge_model",
                                                                                  "sft_model")}}),
        node(bound(row_result, study=study, row=row, seed=seed),
             ["settings", "history", "samples", "scores", "metrics", shared["sft_scores"], "judge_model",
              shared["eval_set"], "params:evaluation", f"params:{study}"], "result", name="row_result_node"),
    ], namespace=f"{study}.{row}.seed_{seed}", inputs=SHARED_MODELS | set(shared.values()) | ({previous} if previous else set()),
        parameters=PARAMETERS | {f"params:{study}"})


def create_pipeline(study: str, rows: list[str], seeds: list[int], prompts: str, training: Node,
                    policy_evaluation: Pipeline, prompt_set: Node) -> Pipeline:
    """The study ``study`` over ``rows`` × ``seeds`` (row by row), its policies evaluated on the ``prompts`` split,
    from the ppo pipeline's ``training`` node and the evaluation pipeline's ``policy_evaluation`` template and
    ``prompt_set`` node (``eval_set``, with the parameters ``<study>.evaluation`` over ``evaluation``)."""
    if "baseline" in rows:  # the namespace of SFT's evaluation on the study's prompts
        raise ValueError(f"settings.STUDIES['{study}']: a row cannot be named 'baseline'")
    keys = [f"{row}.seed_{seed}" for row in rows for seed in seeds]
    results = [f"{study}.{key}.result" for key in keys]
    return Pipeline([
        Pipeline([prompt_set, *policy_evaluation.nodes], namespace=f"{study}.baseline",
                 inputs={"eval_prompts": prompts, "policy": "sft_model", "sft_scores": f"{study}.baseline.scores",
                         **{name: name for name in ("sft_model", "reward_model", "judge_model")}},
                 parameters={"params:evaluation", f"params:{study}.evaluation"}),
        *(row_pipeline(study, row, seed, training, policy_evaluation, previous)
          for (row, seed), previous in zip([(r, s) for r in rows for s in seeds], [None, *results[:-1]], strict=True)),
        node(bound(summarise_study, study=study),
             {"parameters": f"params:{study}", "evaluation": "params:evaluation", "sft_scores": f"{study}.baseline.scores",
              "sft_metrics": f"{study}.baseline.metrics",
              "ppo": "params:ppo", "launcher": "params:launcher",
              **{f"result__{key.replace('.', '__')}": f"{study}.{key}.result" for key in keys}},
             {name: f"{study}.{name}" for name in ("runs", "curves", "summary", "stability", "markdown", "curves_plot",
                                                   "gold_plot", "frontier_plot")}
             | {"metrics": f"{study}_mlflow_metrics"}, name=f"summarise_{study}_node"),
    ])
