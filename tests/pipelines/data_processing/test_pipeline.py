"""The data_processing pipeline over an in-memory catalog: raw rows in, validated prompt-level splits out."""

import json

from rlhf_pipeline.data import SPLITS
from rlhf_pipeline.hh import RawRow
from rlhf_pipeline.pipelines.data_processing.pipeline import create_pipeline
from rlhf_pipeline.task import TaskConfig, generate_preference_rows
from tests.pipelines.conftest import NO_SOURCES, parameters, run


def test_raw_rows_become_splits_with_the_bad_rows_quarantined():
    records = list(generate_preference_rows(TaskConfig(num_pairs=600, seed=5)))
    rows = [RawRow("given.jsonl", i, json.dumps(r).encode()) for i, r in enumerate(records, 1)]
    rows.insert(7, RawRow("given.jsonl", 999, b'{"chosen": "no turns", "rejected": "x"}'))
    catalog = run(create_pipeline(), {"raw_preferences": rows, **NO_SOURCES}, parameters())
    quarantine = catalog.load("quarantine")
    assert quarantine[["source", "line"]].values.tolist() == [["given.jsonl", 999]]
    splits = {name: catalog.load(name) for name in SPLITS}
    sizes = catalog.load("split_sizes")
    assert {name: sizes[f"data/{name}_size"]["value"] for name in SPLITS} == {name: len(f) for name, f in splits.items()}
    assert catalog.load("parse_counts") == {"data/preferences_valid": {"value": 600.0, "step": 0},
                                            "data/preferences_quarantined": {"value": 1.0, "step": 0}}
    for name in ("eval_prompts", "tune_prompts"):  # each held out from every other split
        held_out = set(splits[name]["prompt"])
        assert held_out and not held_out & set().union(*(set(splits[n]["prompt"]) for n in SPLITS if n != name))
