"""Each data layout people bring, the format detected from the fields (or given), every parsed prompt and response
checked against the one derived from the task's own turns. What data_processing writes is the same canonical rows
whatever the layout, so one layout (TRL conversational, with an instruction set and a prompt set of its own) runs
the whole chain with `kedro run --env test`, and the others run the data_processing pipeline on the files as the
catalog reads them (``RawRowsDataset``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from rlhf_pipeline.datasets import RawRowsDataset
from rlhf_pipeline.pipelines.data_processing import create_pipeline
from tests import layouts
from tests.conftest import kedro, make_project_copy
from tests.pipelines.conftest import NO_SOURCES, parameters, run

POLICIES = {"sft", "ppo_max", "vanilla"}


def run_from(project, sources: dict[str, str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """``kedro run --env test`` from the given files (source name -> path), the whole chain: the validated
    preference pairs and the formats read."""
    given = ",".join(f"data_processing.sources.{name}.paths=[{path}]" for name, path in sources.items())
    kedro(project, "run", "--env", "test", "--params", given)
    summary = json.loads((project / "data/08_reporting/evaluation_summary.json").read_text())
    assert set(summary) == POLICIES and all(row["prompts"] > 0 for row in summary.values())
    assert not (project / "data/02_intermediate/quarantine.jsonl").read_text().strip()
    formats = json.loads((project / "data/02_intermediate/source_formats.json").read_text())
    return pd.read_parquet(project / "data/02_intermediate/preferences.parquet"), formats


def process(path: str, source: dict | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """The data_processing pipeline on one preference file, read as the catalog reads it, with conf/test's
    parameters and ``source`` over ``data_processing.sources.preferences``: the pairs and the formats read."""
    params = parameters({"data_processing": {"sources": {"preferences": source or {}}}})
    catalog = run(create_pipeline(), {"raw_preferences": RawRowsDataset(filepath=[path]).load(), **NO_SOURCES}, params)
    assert catalog.load("quarantine").empty
    return catalog.load("preferences"), catalog.load("source_formats")


def pairs_of(frame: pd.DataFrame) -> set[tuple[str, str, str]]:
    return set(frame[["prompt", "chosen", "rejected"]].itertuples(index=False, name=None))


def expected_pairs(dialogues) -> set[tuple[str, str, str]]:
    return {tuple(layouts.expected(d).values()) for d in dialogues}


@pytest.fixture(scope="module")
def dialogues():
    return layouts.task_dialogues(400)


def test_trl_standard_rows(tmp_path, dialogues):
    kept = [d for d in dialogues if layouts.trl_standard(d)]
    path = layouts.write_jsonl(tmp_path / "data/standard.jsonl", map(layouts.trl_standard, kept))
    preferences, formats = process(path)
    assert formats == {"preferences": "standard"}
    assert pairs_of(preferences) == expected_pairs(kept) and len(kept) > 250
    # by hand, one row: the plain-text prompt is one user turn; the responses lose their leading space
    first = kept[0]
    assert preferences.iloc[0].to_dict() == {"prompt": f"\n\nHuman: {first['turns'][0][1]}\n\nAssistant:",
                                             "chosen": first["chosen"], "rejected": first["rejected"]}


@pytest.mark.slow
def test_trl_conversational_with_an_instruction_set_and_a_prompt_set(tmp_path, dialogues):
    pairs, instructions, prompts = dialogues[:300], dialogues[300:350], dialogues[350:]
    data = tmp_path / "data"
    sources = {
        "preferences": layouts.write_jsonl(data / "pairs.jsonl", map(layouts.trl_conversational, pairs)),
        "sft_train": layouts.write_jsonl(data / "sft.jsonl", (
            {"messages": [*layouts.messages(d["turns"]), {"role": "assistant", "content": d["chosen"]}]}
            for d in instructions)),
        "ppo_prompts": layouts.write_jsonl(data / "prompts.jsonl", (
            {"prompt": layouts.messages(d["turns"])} for d in prompts)),
    }
    project = make_project_copy(tmp_path / "p")
    preferences, formats = run_from(project, sources)
    assert formats == dict.fromkeys(sources, "conversational")
    assert pairs_of(preferences) == expected_pairs(pairs)
    splits = {name: pd.read_parquet(project / f"data/05_model_input/{name}.parquet")
              for name in ("sft_train", "ppo_prompts", "eval_prompts", "rm_train")}
    assert set(splits["sft_train"].itertuples(index=False, name=None)) == {
        (layouts.expected(d)["prompt"], d["chosen"]) for d in instructions}
    assert set(splits["ppo_prompts"]["prompt"]) == {layouts.expected(d)["prompt"] for d in prompts}
    others = set(splits["sft_train"]["prompt"]) | set(splits["ppo_prompts"]["prompt"]) | set(splits["rm_train"]["prompt"])
    assert not set(splits["eval_prompts"]["prompt"]) & others  # held out across every source


def test_two_response_columns_picked_by_a_preference_column(tmp_path, dialogues):
    path = layouts.write_jsonl(tmp_path / "data/pku.jsonl",
                               (layouts.two_responses(d, i) for i, d in enumerate(dialogues)))
    preferences, formats = process(path, {"columns": layouts.TWO_RESPONSE_COLUMNS})
    assert formats == {"preferences": "conversational"}  # the mapped prompt column holds messages
    assert pairs_of(preferences) == expected_pairs(dialogues)


def test_deepspeed_chat_rows_forced_format(tmp_path, dialogues):
    path = layouts.write_jsonl(tmp_path / "data/rm_static.jsonl", map(layouts.deepspeed_chat, dialogues))
    preferences, formats = process(path, {"format": "standard"})
    assert formats == {"preferences": "standard"}
    assert pairs_of(preferences) == expected_pairs(dialogues)
    multi_turn = next(d for d in dialogues if len(d["turns"]) > 1)
    assert layouts.expected(multi_turn)["prompt"].count("\n\nHuman:") == 2  # HH prompt text keeps its turns
    assert layouts.expected(multi_turn)["prompt"] in set(preferences["prompt"])
