"""Fixtures for running a pipeline, or a slice of one, over an in-memory ``DataCatalog`` with ``SequentialRunner``
(the Kedro starters' way): the embedded task's pairs and prompts, and tiny untrained models on a tokenizer
trained on them, with conf/test's parameters."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
from kedro.framework.project import configure_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from rlhf_pipeline.data import parse_rows
from rlhf_pipeline.hh import RawRow
from rlhf_pipeline.modeling import (
    ModelBundle,
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    train_tokenizer,
)
from rlhf_pipeline.task import TaskConfig, classify_request, generate_preference_rows
from tests.conftest import PROJECT_ROOT
from tests.test_config import load_parameters


@pytest.fixture(scope="session", autouse=True)
def kedro_project():
    """The project's settings (the namespaces ``settings.py`` declares) for ``create_pipeline``."""
    configure_project("rlhf_pipeline")


@pytest.fixture(scope="session")
def pairs() -> pd.DataFrame:
    """300 of the embedded task's preference pairs (``prompt``, ``chosen``, ``rejected``)."""
    rows = [RawRow("task.jsonl", i, json.dumps(r).encode())
            for i, r in enumerate(generate_preference_rows(TaskConfig(num_pairs=300, seed=3)), 1)]
    return pd.DataFrame(parse_rows(rows).records())


NO_ROWS = pd.DataFrame(columns=["split", "prompt", "response"])  # no stage has a source of its own
NO_SOURCES = {"raw_sft_train": [], "raw_ppo_prompts": [], "raw_tune_prompts": [], "raw_eval_prompts": []}  # as conf/base's catalog loads


def parse_preferences(raw: Any, strict: bool) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``parse_sources`` on a preference source alone: ``(preferences, quarantine, parse_counts)``."""
    from rlhf_pipeline.pipelines.data_processing.nodes import parse_sources

    out = parse_sources({"strict": strict}, raw_preferences=raw)
    return out["preferences"], out["quarantine"], out["parse_counts"]


def prompts_of(frame: pd.DataFrame) -> pd.DataFrame:
    prompts = frame["prompt"].drop_duplicates().reset_index(drop=True)
    return pd.DataFrame({"prompt": prompts, "category": [classify_request(p).category for p in prompts]})


@pytest.fixture(scope="session")
def tokenizer(pairs):
    corpus = pd.concat([pairs["prompt"] + " " + pairs["chosen"], pairs["prompt"] + " " + pairs["rejected"]])
    return train_tokenizer(corpus.tolist(), vocab_size=400)


def tiny(tokenizer, seed: int, value_head: bool = False) -> ModelBundle:
    lm = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_positions=192,
                                                     seed=seed))
    return ModelBundle(ValueHeadModel(lm, seed=seed) if value_head else lm, tokenizer)


def parameters(runtime_params: dict | None = None) -> dict[str, Any]:
    return load_parameters(PROJECT_ROOT / "conf", "test", runtime_params)


def flat_parameters(params: dict[str, Any], prefix: str = "params:") -> dict[str, Any]:
    """Every parameter under the names a Kedro catalog gives it: ``params:a`` and ``params:a.b`` for nested keys."""
    flat = {}
    for key, value in params.items():
        flat[f"{prefix}{key}"] = value
        if isinstance(value, dict):
            flat.update(flat_parameters(value, f"{prefix}{key}."))
    return flat


class KeptDataset(MemoryDataset):
    """A memory dataset that the runner does not empty after its last reader, so that a test can read it."""

    def _release(self) -> None:
        pass


def run(pipeline: Pipeline, data: dict[str, Any], params: dict[str, Any], datasets: dict | None = None,
        **options) -> DataCatalog:
    """Run ``pipeline`` over memory datasets holding ``data`` and ``params`` (plus ``datasets``, e.g. files);
    returns the catalog, which holds every output."""
    given = {**{name: MemoryDataset(value) for name, value in data.items()},
             **{name: MemoryDataset(value, copy_mode="assign") for name, value in flat_parameters(params).items()},
             **(datasets or {})}
    outputs = {name: KeptDataset(copy_mode="assign") for name in pipeline.datasets() if name not in given}
    catalog = DataCatalog(datasets={**given, **outputs})
    SequentialRunner().run(pipeline, catalog, **options)
    return catalog
