"""Project pipelines: one per stage; ``__default__`` runs the five stages in order. Each study of ``settings.STUDIES``
(``kedro run --pipeline ablation``, ``long_run``, ``tuning``) is composed here from the ppo pipeline's training node
and the evaluation pipeline's policy evaluation over the rows and seeds it declares; studies run on request only."""

from kedro.framework.project import settings
from kedro.pipeline import Pipeline

from rlhf_pipeline.pipelines import data_processing, evaluation, ppo, reward_model, sft, studies
from rlhf_pipeline.pipelines.evaluation.pipeline import policy_evaluation, prompt_set
from rlhf_pipeline.pipelines.ppo.pipeline import training


def register_pipelines() -> dict[str, Pipeline]:
    stages = {"data_processing": data_processing.create_pipeline(), "sft": sft.create_pipeline(),
              "reward_model": reward_model.create_pipeline(), "ppo": ppo.create_pipeline(),
              "evaluation": evaluation.create_pipeline()}
    grids = {name: studies.create_pipeline(name, study.rows, study.seeds, study.prompts, training(),
                                           policy_evaluation(), prompt_set(f"params:{name}.evaluation"))
             for name, study in settings.STUDIES.items()}
    return {**stages, "__default__": sum(stages.values(), Pipeline([])), **grids}
