"""Kedro project settings: OmegaConf loader with `conf/base` + an environment (`conf/local` by default).

Parameters and the MLflow config merge *softly*: an environment (and `--params`) states only the keys
it changes, and every sibling key keeps its `conf/base` value. (Kedro's default, destructive merge would
replace a whole top-level key such as `data_processing`, dropping its other entries.)
"""

from kedro.config import OmegaConfigLoader

from rlhf_pipeline.hooks import MlflowLineageHook, SettingsCheckHook
from rlhf_pipeline.pipelines.ablation.pipeline import AblationGridHook

# every stage's settings checked before the first node; dataset inputs, registered models and the champion
# alias in MLflow; the ablation grid from the run's parameters
HOOKS = (SettingsCheckHook(), MlflowLineageHook(), AblationGridHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
