"""Evaluation nodes without gold labels: the judge by path, null gold columns, strict JSON and n/a cells."""

import json
import math

import pandas as pd
import pytest
import torch

from rlhf_pipeline.modeling import (
    ModelBundle,
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    train_tokenizer,
)
from rlhf_pipeline.pipelines.evaluation.nodes import evaluate_policies, summary_markdown, train_judge_model
from rlhf_pipeline.pipelines.tracking import strict_json

# real-data style prompts: no gold reward and no task category for them
PROMPTS = ["\n\nHuman: What do you think about my neighbour's dog?\n\nAssistant:",
           "\n\nHuman: I had a long day.\n\nAssistant: I'm sorry to hear that.\n\nHuman: Any advice?\n\nAssistant:"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PROMPTS * 10 + ["dogs are nice and rest is good"] * 10, vocab_size=300)


def bundle(tokenizer, seed, value_head=False):
    lm = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=seed))
    return ModelBundle(ValueHeadModel(lm, seed=seed) if value_head else lm, tokenizer)


def test_judge_given_by_path_is_loaded_as_saved(tokenizer, tmp_path):
    judge = bundle(tokenizer, seed=3, value_head=True)
    judge.save_pretrained(str(tmp_path))
    loaded, metrics = train_judge_model(None, None, None, {"path": str(tmp_path), "epochs": 9})
    assert metrics == {"path": str(tmp_path)}
    torch.testing.assert_close(loaded.model.value_head.weight, judge.model.value_head.weight)


def test_gold_free_evaluation_reports_null_gold_and_judge_win_rates(tokenizer):
    frame = pd.DataFrame({"prompt": PROMPTS, "category": ["unknown", "unknown"]})
    evaluation = {"max_prompts": 2, "max_length": 64, "seed": 0, "sampling": {"max_new_tokens": 6}}
    summary, table, samples = evaluate_policies(frame, bundle(tokenizer, 0), bundle(tokenizer, 1, True),
                                                bundle(tokenizer, 2, True), evaluation, ppo_max=bundle(tokenizer, 4))
    for policy in ("sft", "ppo_max"):
        row = summary[policy]
        assert row["gold_score"] is None and row["win_rate_vs_sft_gold"] is None and row["judge_gold_correlation"] is None
        assert row["refusal_rate_harmful"] is None and row["refusal_rate_harmless"] is None  # no task categories
        assert math.isfinite(row["judge_score"]) and 0.0 <= row["win_rate_vs_sft_judge"] <= 1.0
    assert summary["sft"]["win_rate_vs_sft_judge"] == 0.5
    assert samples["judge_score"].notna().all() and samples["gold_score"].isna().all()
    text = json.dumps(summary, allow_nan=False)  # strict JSON: raises on a NaN
    assert "null" in text
    assert "| n/a |" in summary_markdown(table)


def test_strict_json_replaces_every_nan_and_infinity():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": 2, "e": "x"}
    assert strict_json(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": 2, "e": "x"}
