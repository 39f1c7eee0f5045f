"""The evaluation pipeline from its prompt set on, run over an in-memory catalog: the per-policy metrics against
SFT recomputed from the sampled responses, the champion, and the same on real-data prompts without gold."""

import json
import math

import pandas as pd
import pytest

from rlhf_pipeline.evaluation import win_rate
from rlhf_pipeline.pipelines.evaluation.nodes import select_champion
from rlhf_pipeline.pipelines.evaluation.pipeline import create_pipeline
from rlhf_pipeline.reporting import markdown_table, strict_json
from tests.pipelines.conftest import parameters, prompts_of, run, tiny

# real-data style prompts: no gold reward and no task category for them
REAL_PROMPTS = ["\n\nHuman: What do you think about my neighbour's dog?\n\nAssistant:",
                "\n\nHuman: I had a long day.\n\nAssistant: I'm sorry to hear that.\n\nHuman: Any advice?\n\nAssistant:"]


def history(seed: int) -> pd.DataFrame:
    return pd.DataFrame({"step": [1, 2], "reward/raw_score": [0.1 * seed, 0.2], "kl/sequence": [0.0, 0.1],
                         "response/perplexity": [9.0, 8.0], "response/length": [10.0, 11.0]})


def evaluate(tokenizer, eval_prompts: pd.DataFrame) -> dict:
    """The pipeline from ``evaluation_set_node`` on (the judge given, not trained), with two PPO policies."""
    data = {"eval_prompts": eval_prompts, "sft_model": tiny(tokenizer, 0), "reward_model": tiny(tokenizer, 1, True),
            "judge_model": tiny(tokenizer, 2, True), "ppo.ppo_max.policy": tiny(tokenizer, 4),
            "ppo.vanilla.policy": tiny(tokenizer, 5), "ppo.ppo_max.history": history(1), "ppo.vanilla.history": history(2)}
    params = parameters({"evaluation": {"max_prompts": 10, "sampling": {"max_new_tokens": 6}}})
    catalog = run(create_pipeline().from_nodes("evaluation_set_node"), data, params)
    return {name: catalog.load(name) for name in ("evaluation_summary", "evaluation_samples", "evaluation_markdown",
                                                  "champion", "evaluation_mlflow_metrics")}


def test_each_policys_metrics_are_its_samples_against_sfts_on_the_same_prompts(tokenizer, pairs):
    out = evaluate(tokenizer, prompts_of(pairs))
    summary, samples = out["evaluation_summary"], out["evaluation_samples"]
    assert list(summary) == ["sft", "ppo_max", "vanilla"]
    sft = samples[samples["policy"] == "sft"].reset_index(drop=True)
    for name in ("ppo_max", "vanilla"):
        own = samples[samples["policy"] == name].reset_index(drop=True)
        assert own["prompt"].tolist() == sft["prompt"].tolist() and len(own) == summary[name]["prompts"] == 10
        for scorer in ("gold", "rm", "judge"):
            assert summary[name][f"win_rate_vs_sft_{scorer}"] == pytest.approx(
                win_rate(own[f"{scorer}_score"].tolist(), sft[f"{scorer}_score"].tolist()))
            assert summary[name][f"{scorer}_score"] == pytest.approx(own[f"{scorer}_score"].mean())
        assert abs(summary[name]["kl_to_sft"]) > 1e-3  # another model than SFT: its k1 estimate is not 0
    assert abs(summary["sft"]["kl_to_sft"]) < 1e-5
    best = max(("ppo_max", "vanilla"), key=lambda name: summary[name]["gold_score"])
    assert out["champion"] == {"policy": best, "by": "gold_score", "value": summary[best]["gold_score"]}
    metrics = out["evaluation_mlflow_metrics"]
    assert metrics["evaluation/vanilla/kl_to_sft"] == {"value": summary["vanilla"]["kl_to_sft"], "step": 0}
    assert "| ppo_max |" in out["evaluation_markdown"]


def test_gold_free_evaluation_reports_null_gold_and_ranks_by_judge(tokenizer):
    out = evaluate(tokenizer, pd.DataFrame({"prompt": REAL_PROMPTS, "category": ["unknown", "unknown"]}))
    summary = out["evaluation_summary"]
    for policy in ("sft", "ppo_max", "vanilla"):
        row = summary[policy]
        assert row["gold_score"] is None and row["win_rate_vs_sft_gold"] is None and row["judge_gold_correlation"] is None
        assert row["refusal_rate_harmful"] is None and row["refusal_rate_harmless"] is None  # no task categories
        assert math.isfinite(row["judge_score"])
    json.dumps(summary, allow_nan=False)  # strict JSON: raises on a NaN
    assert out["evaluation_samples"]["gold_score"].isna().all()
    assert "| n/a |" in out["evaluation_markdown"]
    best = max(("ppo_max", "vanilla"), key=lambda name: summary[name]["judge_score"])
    assert out["champion"]["policy"] == best and out["champion"]["by"] == "judge_score"
    assert not any(name.endswith("gold_score") for name in out["evaluation_mlflow_metrics"])  # null: not logged


def test_champion_is_the_best_ppo_policy_by_the_first_score_that_exists():
    summary = {"sft": {"gold_score": 9.0, "judge_score": 9.0}, "a": {"gold_score": -1.0, "judge_score": 0.5},
               "b": {"gold_score": -0.5, "judge_score": 0.1}}
    assert select_champion(summary, ["gold_score", "judge_score"]) == {"policy": "b", "by": "gold_score", "value": -0.5}
    no_gold = {name: {**row, "gold_score": None} for name, row in summary.items()}
    assert select_champion(no_gold, ["gold_score", "judge_score"])["policy"] == "a"
    assert select_champion(no_gold, ["gold_score"]) == {}


def test_strict_json_and_markdown_write_missing_values_as_null_and_na():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": 2, "e": "x"}
    assert strict_json(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": 2, "e": "x"}
    table = markdown_table(pd.DataFrame({"policy": ["sft"], "gold": [None], "kl": [0.12345]}))
    assert table.splitlines() == ["| policy | gold | kl |", "|---|---|---|", "| sft | n/a | 0.123 |"]
