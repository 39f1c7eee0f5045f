"""Project pipelines: one per stage, found by `find_pipelines`; `__default__` runs the five stages in order.
The ablation study (`kedro run --pipeline ablation`) trains a grid of variants × seeds: it runs on request only."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum((p for name, p in pipelines.items() if name != "ablation"), Pipeline([]))
    return pipelines
