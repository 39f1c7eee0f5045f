"""Kedro project settings: OmegaConf loader with `conf/base` + an environment (`conf/local` by default), the hooks,
and the namespaces the ppo and evaluation pipelines and the studies instantiate.

Parameters and the MLflow config merge *softly*: an environment (and `--params`) states only the keys
it changes, and every sibling key keeps its `conf/base` value. (Kedro's default, destructive merge would
replace a whole top-level key such as `data_processing`, dropping its other entries.)
"""

import logging
from typing import Any, NamedTuple

from kedro.config import OmegaConfigLoader

from rlhf_pipeline.hooks import MlflowLineageHook, ProvenanceHook, SettingsCheckHook

# Kedro resolves every node's type hints to validate typed parameters; the nodes name the core's types (models,
# configs) only for type checkers, so that building the pipelines imports no torch, and none of them types a
# parameter. Without this, each such node logs a warning on every run. (A filter, not a level: Kedro's logging
# set-up resets the levels of its child loggers.)
logging.getLogger("kedro.validation.type_extractor").addFilter(lambda record: record.levelno >= logging.ERROR)

# every stage's settings checked before the first node; dataset inputs, registered models and the champion
# alias in MLflow
HOOKS = (SettingsCheckHook(), MlflowLineageHook(), ProvenanceHook())



def files_or(paths: Any, source: Any) -> Any:
    """The catalog entry of a raw source: the files given on the command line (``--params
    "data_processing.sources.<name>.paths=[FILE]"``, read by the project's ``RawRowsDataset``), or else the
    environment's own ``source`` entry (``paths``: a list or None; ``source``: a mapping; OmegaConf passes its
    own containers)."""
    return {"type": "rlhf_pipeline.datasets.RawRowsDataset", "filepath": list(paths)} if paths else source


CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
    "custom_resolvers": {"files_or": files_or},
}

# Kedro's dynamic pipelines: a namespace per name. `ppo`: the presets the ppo pipeline trains and the evaluation
# compares (each a block of parameters_ppo.yml).
DYNAMIC_PIPELINES_MAPPING = {"ppo": ["ppo_max", "vanilla"]}


class Study(NamedTuple):
    """A grid of PPO runs (``kedro run --pipeline <study>``): ``rows``, each a block of ``<study>.rows`` in
    parameters_studies.yml, trained once per seed of ``seeds`` (in this order: a study stopped early holds the
    first rows) and evaluated against SFT on the ``prompts`` split."""

    rows: list[str]
    seeds: list[int]
    prompts: str = "eval_prompts"


STUDIES = {
    # the paper's §5: PPO-max with one trick left out per row, vanilla PPO and TRL's PPOTrainer
    "ablation": Study(["ppo_max", "trl_ppo", "ppo_max_paper", "vanilla", "no_score_norm", "no_kl", "reward_scaling",
                       "entropy_bonus", "no_advantage_whitening", "no_value_clip", "critic_from_sft", "no_critic_warmup",
                       "no_ptx"], [0, 1, 2]),
    # stability over 4x the iterations (the paper's Fig. 9 claim)
    "long_run": Study(["ppo_max_paper", "vanilla", "ppo_max", "no_kl", "trl_ppo", "no_score_norm"], [0, 1, 2]),
    # the ppo_max preset's values, chosen on the tuning prompts (never the evaluation's)
    "tuning": Study(["ppo_max_paper", "clip_2", "clip_4", "clip_2_kl_0p1", "clip_2_lr_3e5", "clip_2_ptx_0p03"], [0, 1],
                    "tune_prompts"),
}
