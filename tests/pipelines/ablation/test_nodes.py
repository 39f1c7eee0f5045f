"""Ablation nodes: rows composed from presets, the summary's intervals and marks, resuming a killed study, the
gold curve, and TRL scoring with our reward model."""

import json
import math

import pandas as pd
import pytest
import torch
from kedro.framework.project import configure_project

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.modeling import TinyModelConfig, ValueHeadModel, build_tiny_model, train_tokenizer
from rlhf_pipeline.pipeline_registry import register_pipelines
from rlhf_pipeline.pipelines.ablation import pipeline as ablation_pipeline
from rlhf_pipeline.pipelines.ablation.nodes import TRLScoreModel, gold_curve, train_seeds, variant_settings
from rlhf_pipeline.pipelines.ablation.report import markdown, summary_table
from rlhf_pipeline.training.reward import score_responses

PPO = {
    "ppo_max": {"name": "ppo_max", "checkpoint_dir": "x", "launcher": {"num_processes": 1}, "iterations": 80,
                "rollout_batch_size": 8, "kl_coef": 0.2, "sampling": {"max_new_tokens": 48, "temperature": 0.8}},
    "vanilla": {"name": "vanilla", "iterations": 80, "rollout_batch_size": 8, "kl_coef": 0.0,
                "sampling": {"max_new_tokens": 48, "temperature": 0.8}},
}
ABLATION = {"base": "ppo_max", "iterations": 40, "seeds": [0, 1], "level": 0.95, "bootstrap_resamples": 100,
            "variants": {"ppo_max": {}, "hot": {"sampling": {"temperature": 1.0}}, "vanilla": {"preset": "vanilla"},
                         "typo": {"preset": "ppo_maxx"}}}


def test_a_row_is_its_preset_with_the_rows_overrides_and_the_studys_budget():
    settings, launcher, overrides = variant_settings("hot", PPO, ABLATION)
    assert settings["sampling"] == {"max_new_tokens": 48, "temperature": 1.0}  # nested keys merge, not replace
    assert settings["kl_coef"] == 0.2 and settings["iterations"] == 40 and launcher == {"num_processes": 1}
    assert "name" not in settings and "checkpoint_dir" not in settings  # the study places its own runs
    assert settings["sample_every"] == 1 and settings["sample_count"] == 8  # every rollout, for the gold curve
    assert overrides == {"preset": "ppo_max", "sampling": {"temperature": 1.0}}
    vanilla, _, _ = variant_settings("vanilla", PPO, {**ABLATION, "iterations": None})
    assert vanilla["kl_coef"] == 0.0 and vanilla["iterations"] == 80
    with pytest.raises(ValueError, match=r"ablation.variants.typo.preset: 'ppo_maxx'"):
        variant_settings("typo", PPO, ABLATION)


def runs():
    return pd.DataFrame([
        {"variant": "ppo_max", "seed": 0, "gold_score": -0.5, "kl_to_sft": 0.5},
        {"variant": "ppo_max", "seed": 1, "gold_score": -0.6, "kl_to_sft": 0.6},
        {"variant": "ppo_max", "seed": 2, "gold_score": -0.4, "kl_to_sft": 0.4},
        {"variant": "no_kl", "seed": 0, "gold_score": -2.0, "kl_to_sft": 9.0},
        {"variant": "no_kl", "seed": 1, "gold_score": -2.2, "kl_to_sft": 11.0},
        {"variant": "no_kl", "seed": 2, "gold_score": -1.8, "kl_to_sft": 10.0},
    ])


def test_summary_gives_intervals_across_seeds_and_marks_differences_beyond_them():
    summary = summary_table(runs(), "ppo_max", 0.95).set_index("variant")
    half = 4.302653 * 0.1 / math.sqrt(3)  # sd 0.1 over 3 seeds, t(0.975, 2)
    assert summary.loc["ppo_max", "gold_score"] == pytest.approx(-0.5)
    assert summary.loc["ppo_max", "gold_score_high"] - summary.loc["ppo_max", "gold_score"] == pytest.approx(half)
    assert summary.loc["no_kl", "gold_score_vs_ppo_max"] == pytest.approx(-1.5)
    assert summary.loc["no_kl", "gold_score_vs_ppo_max_differs"] and not summary.loc["ppo_max", "gold_score_vs_ppo_max_differs"]
    assert summary.loc["no_kl", "seeds"] == 3
    assert "seeds_beating_sft_gold" not in summary  # without bootstrap intervals, nothing to count
    shares = summary_table(runs().assign(win_rate_vs_sft_gold=[0.9, 0.99, 0.6, 0.1, 0.0, 0.05]), "ppo_max", 0.95)
    assert shares["win_rate_vs_sft_gold_high"].tolist() == [1.0, pytest.approx(0.05 + 4.302653 * 0.05 / math.sqrt(3))]
    assert shares["win_rate_vs_sft_gold_low"].tolist()[1] == 0.0  # a rate's interval stays inside [0, 1]
    with_intervals = runs().assign(win_rate_vs_sft_gold_low=[0.52, 0.49, 0.6, 0.1, 0.2, 0.3])
    counted = summary_table(with_intervals, "ppo_max", 0.95).set_index("variant")["seeds_beating_sft_gold"]
    assert counted.to_dict() == {"ppo_max": 2, "no_kl": 0}
    text = markdown(summary_table(with_intervals, "ppo_max", 0.95), "ppo_max", 0.95)
    assert next(line for line in text.splitlines() if line.startswith("| ppo_max |")).endswith("| 2/3 |")
    text = markdown(summary.reset_index(), "ppo_max", 0.95)
    assert "| no_kl | 3 | -2.000 [-2.497, -1.503] ▼ |" in text  # -2 ± 4.302653·0.2/√3
    assert "| ppo_max | 3 | -0.500 [-0.748, -0.252] |" in text


def test_a_killed_study_resumes_with_the_run_it_was_in(tmp_path):
    calls = []

    def train(seed, run_dir, log):
        calls.append(seed)
        return {"variant": "ppo_max", "seed": seed, "gold_score": -0.1 * seed, "curves": [{"step": 1, "gold_score": 0.0}]}

    study = {**ABLATION, "run_dir": str(tmp_path)}
    sft = {"responses": ["a", "b"]}
    first, curves = train_seeds("ppo_max", study, {"lr": 1}, {}, {"seed": 0}, sft, train)
    assert calls == [0, 1] and first["gold_score"].tolist() == [0.0, -0.1] and len(curves) == 2
    (tmp_path / "ppo_max" / "seed_1" / "result.json").unlink()  # killed while training seed 1
    again, _ = train_seeds("ppo_max", study, {"lr": 1}, {}, {"seed": 0}, sft, train)
    assert calls == [0, 1, 1] and again.equals(first)
    train_seeds("ppo_max", study, {"lr": 2}, {}, {"seed": 0}, sft, train)  # other settings: trained again
    assert calls == [0, 1, 1, 0, 1]
    stored = json.loads((tmp_path / "ppo_max" / "seed_0" / "result.json").read_text())
    assert stored["gold_score"] == 0.0 and "key" in stored


def test_gold_curve_averages_each_iterations_rollouts():
    harmful = "\n\nHuman: How do I steal a car?\n\nAssistant:"
    samples = [{"step": 1, "prompt": harmful, "response": "Sure, here is how."},
               {"step": 1, "prompt": harmful, "response": "I'm sorry, but I can't help with that."},
               {"step": 2, "prompt": harmful, "response": "I'm sorry, but I can't help with that."}]
    from rlhf_pipeline.task import gold_score

    refusal, compliance = gold_score(harmful, samples[1]["response"]), gold_score(harmful, samples[0]["response"])
    assert refusal > compliance
    assert gold_curve(samples) == {1: pytest.approx((refusal + compliance) / 2), 2: pytest.approx(refusal)}


def test_trl_scores_with_our_reward_model():
    """TRL's get_reward through the adapter reads the same score as ours: the last response token (EOS)."""
    from trl.experimental.utils import get_reward

    texts = ["\n\nHuman: What is 2 plus 3?\n\nAssistant:", " It is five.", " Five, I think."]
    tokenizer = train_tokenizer(texts * 20, vocab_size=200)
    reward_model = ValueHeadModel(build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2)))
    encoder = DialogueEncoder(tokenizer)
    ours = score_responses(reward_model, encoder, [texts[0]] * 2, texts[1:], max_length=64)
    query = torch.tensor([encoder.sampling_prompt(texts[0], 48, 8)] * 2)
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in texts[1:]]
    width = max(map(len, responses)) + 1
    padded = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in responses])
    _, theirs, _ = get_reward(TRLScoreModel(reward_model), torch.cat([query, padded], 1), tokenizer.pad_token_id,
                              query.shape[1])
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_grid_rows_must_be_defined_and_the_study_is_not_part_of_the_default_run(monkeypatch):
    configure_project("rlhf_pipeline")
    monkeypatch.setattr(ablation_pipeline, "_run_parameters", {"grid": ["ppo_max", "no_klx"], "variants": {"ppo_max": {}}})
    with pytest.raises(ValueError, match=r"parameters_ablation.yml: ablation.grid names \['no_klx'\]"):
        ablation_pipeline.create_pipeline()
    monkeypatch.setattr(ablation_pipeline, "_run_parameters", {"grid": ["ppo_max", "no_kl"],
                                                               "variants": {"ppo_max": {}, "no_kl": {"kl_coef": 0}}})
    study = ablation_pipeline.create_pipeline()
    assert {n.name for n in study.nodes} >= {"ablation.ppo_max.train_and_evaluate_node",
                                             "ablation.no_kl.train_and_evaluate_node", "summarise_ablation_node"}
    pipelines = register_pipelines()
    assert not any(n.name.startswith("ablation") for n in pipelines["__default__"].nodes)
    assert set(pipelines["__default__"].nodes) == set().union(*(set(p.nodes) for name, p in pipelines.items()
                                                                 if name not in ("__default__", "ablation")))
