import json

import pandas as pd
import pytest

from rlhf_pipeline.data import SPLITS, assign_splits
from rlhf_pipeline.hh import RawRow, RowError
from rlhf_pipeline.pipelines.data_processing.nodes import split_preferences
from rlhf_pipeline.task import TaskConfig, generate_preference_rows
from tests.pipelines.conftest import NO_ROWS, parse_preferences

SPLIT = {"seed": 0, "fractions": {"sft_train": 0.3, "rm_train": 0.3, "rm_val": 0.05, "ppo_prompts": 0.12, "tune_prompts": 0.03,
                                  "eval_prompts": 0.1,
                                  "judge_train": 0.1}}

LAUNCHER = {"num_processes": 1, "work_dir": "data/06_models"}
PPO = {"ppo_max": {"rollout_batch_size": 8, "launcher": {"num_processes": 1}}, "vanilla": {"rollout_batch_size": 8}}


def rows_of(records) -> list[RawRow]:
    return [RawRow("synthetic_hh.jsonl", i, json.dumps(r).encode()) for i, r in enumerate(records, 1)]


@pytest.fixture(scope="module")
def preferences() -> pd.DataFrame:
    records = generate_preference_rows(TaskConfig(num_pairs=1500, seed=1))
    valid, quarantine, counts = parse_preferences(rows_of(records), strict=False)
    assert quarantine.empty and counts["data/preferences_valid"]["value"] == 1500
    return valid


def test_no_prompt_crosses_splits_and_eval_is_unseen(preferences):
    out = split_preferences(preferences, NO_ROWS, SPLIT, PPO, LAUNCHER)
    sft, rm_train, rm_val, ppo, tune, evaluation, judge, sizes = (out[name] for name in (*SPLITS, "split_sizes"))
    training = set(sft["prompt"]) | set(rm_train["prompt"]) | set(rm_val["prompt"]) | set(ppo["prompt"])
    assert evaluation["prompt"].nunique() == len(evaluation) > 20
    assert not set(evaluation["prompt"]) & (training | set(judge["prompt"]) | set(tune["prompt"]))
    assert len(tune) > 5 and not set(tune["prompt"]) & (training | set(judge["prompt"]))
    assert len(judge) > 50 and not set(judge["prompt"]) & training  # PPO's RM and the judge share no prompt
    assert not set(sft["prompt"]) & set(rm_train["prompt"])
    assert not set(rm_train["prompt"]) & set(rm_val["prompt"])
    assert sizes["data/eval_prompts_size"]["value"] == len(evaluation)
    assert set(evaluation["category"]) >= {"arithmetic", "harmful"}


def test_duplicates_are_dropped(preferences):
    doubled = pd.concat([preferences, preferences.head(100)], ignore_index=True)
    outputs = split_preferences(doubled, NO_ROWS, SPLIT, PPO, LAUNCHER)
    pairs_in = split_preferences(preferences.drop_duplicates(), NO_ROWS, SPLIT, PPO, LAUNCHER)
    for name in ("sft_train", "rm_train", "rm_val"):
        assert len(outputs[name]) == len(pairs_in[name])


def test_max_pairs_splits_a_seeded_sample(preferences):
    outputs = split_preferences(preferences, NO_ROWS, {**SPLIT, "max_pairs": 600}, PPO, LAUNCHER)
    pairs = sum(len(outputs[name]) for name in ("sft_train", "rm_train", "rm_val", "judge_train"))
    assert 400 < pairs < 600  # ppo and eval splits hold unique prompts, not pairs
    assert outputs["split_sizes"]["data/sft_train_size"]["value"] == len(outputs["sft_train"]) < 0.4 * 600
    again = split_preferences(preferences, NO_ROWS, {**SPLIT, "max_pairs": 600}, PPO, LAUNCHER)
    assert outputs["sft_train"].equals(again["sft_train"])


def test_ppo_prompts_smaller_than_a_rollout_buffer_fail_naming_split_variant_and_fix(preferences):
    tiny_ppo_split = {**SPLIT, "fractions": {**SPLIT["fractions"], "ppo_prompts": 0.004}}
    ppo = {"ppo_max": {"rollout_batch_size": 8, "launcher": {"num_processes": 1}},
           "vanilla": {"rollout_batch_size": 2, "launcher": {"num_processes": 1}}}
    with pytest.raises(ValueError) as error:
        split_preferences(preferences, NO_ROWS, tiny_ppo_split, ppo, LAUNCHER)
    message = str(error.value)
    assert "split 'ppo_prompts' holds" in message and "ppo.ppo_max.rollout_batch_size 8 x 1 process(es)" in message
    assert "data_processing.split.fractions.ppo_prompts (now 0.004)" in message
    assert "vanilla" not in message  # its buffer of 2 fits
    # ranks per node multiply the buffer: 100 prompts fit 8 x 1 but not 8 x 16
    prompts = len(split_preferences(preferences, NO_ROWS, SPLIT, PPO, LAUNCHER)["ppo_prompts"])
    assert 8 < prompts < 8 * 16
    with pytest.raises(ValueError, match=r"ppo.vanilla.rollout_batch_size 8 x 16 process\(es\)"):
        split_preferences(preferences, NO_ROWS, SPLIT, {"vanilla": {"rollout_batch_size": 8, "launcher": {"num_processes": 16}}},
                          LAUNCHER)
    with pytest.raises(ValueError, match=r"ppo.vanilla.rollout_batch_size 8 x 16 process\(es\)"):  # the run's launcher
        split_preferences(preferences, NO_ROWS, SPLIT, {"vanilla": {"rollout_batch_size": 8}}, {"num_processes": 16})


def test_split_is_stable_per_prompt_and_close_to_fractions():
    prompts = pd.Series([f"\n\nHuman: q{i}\n\nAssistant:" for i in range(4000)])
    splits = assign_splits(prompts, SPLIT["fractions"], seed=0)
    assert (splits == assign_splits(prompts, SPLIT["fractions"], seed=0)).all()
    assert splits.value_counts(normalize=True)["eval_prompts"] == pytest.approx(0.10, abs=0.02)
    with pytest.raises(ValueError, match="unknown split"):
        assign_splits(prompts, {"test": 1.0}, seed=0)


def test_strict_mode_names_file_and_line_default_mode_quarantines():
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    rows = rows_of([good, {"chosen": "x"}, good])
    with pytest.raises(RowError, match=r"synthetic_hh.jsonl:2: missing field 'rejected'"):
        parse_preferences(rows, strict=True)
    valid, quarantine, counts = parse_preferences(rows, strict=False)
    assert len(valid) == 2 and quarantine.loc[0, "line"] == 2
    assert counts["data/preferences_quarantined"]["value"] == 1



# --- a stage's own source -------------------------------------------------------------------------------------------
def test_a_stage_source_replaces_its_split_and_leaked_eval_prompts_are_removed_and_counted(preferences):
    plain = split_preferences(preferences, NO_ROWS, SPLIT, PPO, LAUNCHER)
    leaked = plain["eval_prompts"]["prompt"].head(3).tolist()  # evaluation prompts a user's PPO set also holds
    own = [f"\n\nHuman: own prompt {i}\n\nAssistant:" for i in range(40)]
    stage_rows = pd.DataFrame({"split": "ppo_prompts", "prompt": own + leaked, "response": None})
    out = split_preferences(preferences, stage_rows, SPLIT, PPO, LAUNCHER)
    assert set(out["ppo_prompts"]["prompt"]) == set(own + leaked)
    assert not set(out["eval_prompts"]["prompt"]) & set(leaked)
    sizes = out["split_sizes"]
    assert sizes["data/eval_prompts_leaked"]["value"] == 3
    # the pairs no longer feed ppo_prompts: its 0.15 share went to the others
    assert len(out["sft_train"]) > len(plain["sft_train"])
    assert sizes["data/eval_prompts_size"]["value"] == len(out["eval_prompts"])
    # a tuning source loses the prompts that PPO trains on and those the evaluation holds (never tuned on)
    fresh = [f"\n\nHuman: tuning prompt {i}\n\nAssistant:" for i in range(5)]
    def tuning(prompts: list[str]) -> dict:
        given = pd.DataFrame({"split": ["ppo_prompts"] * len(own) + ["tune_prompts"] * len(prompts),
                              "prompt": own + prompts, "response": None})
        return split_preferences(preferences, given, SPLIT, PPO, LAUNCHER)
    evaluation = tuning(fresh)["eval_prompts"]["prompt"].head(4).tolist()
    cut = tuning([*fresh, *own[:3], *evaluation])
    assert cut["tune_prompts"]["prompt"].tolist() == fresh and cut["eval_prompts"]["prompt"].head(4).tolist() == evaluation
    assert cut["split_sizes"]["data/tune_prompts_leaked"]["value"] == 7
    every = pd.DataFrame({"split": "ppo_prompts", "prompt": [*own, *leaked, *out["eval_prompts"]["prompt"]],
                          "response": None})
    with pytest.raises(ValueError, match=r"every prompt of 'eval_prompts' \(\d+\) is also in another split"):
        split_preferences(preferences, every, SPLIT, PPO, LAUNCHER)


def test_a_source_without_a_valid_row_fails_naming_format_counts_and_reasons():
    from rlhf_pipeline.pipelines.data_processing.nodes import parse_sources

    bad = [RawRow("sft.jsonl", i, json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
           for i in (1, 2)]
    good = rows_of(generate_preference_rows(TaskConfig(num_pairs=5, seed=1)))
    with pytest.raises(ValueError, match=r"raw_sft_train: no valid row \(format 'conversational', 2 row\(s\) "
                                         r"quarantined; top reasons: 2 x field 'messages': the conversation does not end"):
        parse_sources({"strict": False}, raw_preferences=good, raw_sft_train=bad)
    with pytest.raises(ValueError, match=r"data_processing.sources.preferences: unknown key\(s\) \['colums'\]"):
        parse_sources({"strict": False, "sources": {"preferences": {"colums": {}}}}, raw_preferences=good)
    with pytest.raises(ValueError, match=r"data_processing.sources.sft_train: unknown key\(s\) \['hub_id'\]"):
        parse_sources({"strict": False, "sources": {"sft_train": {"hub_id": "x"}}}, raw_preferences=good)
    # paths: the catalog reads them from the command line; written in a parameters file they would be ignored
    out = parse_sources({"strict": False, "sources": {"preferences": {"paths": ["synthetic_hh.jsonl"]}}}, raw_preferences=good)
    assert out["source_formats"] == {"preferences": "hh"}
    with pytest.raises(ValueError, match=r"sources.ppo_prompts.paths \['p.jsonl'\] were not read: .* command line"):
        parse_sources({"strict": False, "sources": {"ppo_prompts": {"paths": ["p.jsonl"]}}}, raw_preferences=good)
