"""The embedded task's pairs written in the layouts people bring (TRL standard and conversational, a two-response
layout with a preference column, DeepSpeed-Chat's), for the data-format tests. Each layout comes with the
canonical prompt and responses the project must read from it, derived here from the task's turns, not by the
parser under test."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_pipeline.hh import render_prompt, split_turns
from rlhf_pipeline.task import TaskConfig, generate_preference_rows

ROLE = {"Human": "user", "Assistant": "assistant"}


def task_dialogues(num_pairs: int, seed: int = 0) -> list[dict]:
    """The task's pairs as ``turns`` (the prompt's ``(speaker, text)``), ``chosen``, ``rejected``."""
    out = []
    for row in generate_preference_rows(TaskConfig(num_pairs=num_pairs, seed=seed)):
        chosen_turns, rejected_turns = split_turns(row["chosen"]), split_turns(row["rejected"])
        out.append({"turns": chosen_turns[:-1], "chosen": chosen_turns[-1][1], "rejected": rejected_turns[-1][1]})
    return out


def messages(turns) -> list[dict]:
    return [{"role": ROLE[speaker], "content": text} for speaker, text in turns]


def expected(dialogue: dict) -> dict:
    """The canonical row: HH prompt text with an open assistant turn, stripped responses."""
    return {"prompt": render_prompt(dialogue["turns"]), "chosen": dialogue["chosen"], "rejected": dialogue["rejected"]}


def trl_standard(dialogue: dict) -> dict | None:
    """TRL's standard row, plain-text prompt: single-turn dialogues only (a plain string holds one user turn)."""
    if len(dialogue["turns"]) != 1:
        return None
    return {"prompt": dialogue["turns"][0][1], "chosen": " " + dialogue["chosen"], "rejected": " " + dialogue["rejected"]}


def trl_conversational(dialogue: dict) -> dict:
    return {"prompt": messages(dialogue["turns"]), "chosen": [{"role": "assistant", "content": dialogue["chosen"]}],
            "rejected": [{"role": "assistant", "content": dialogue["rejected"]}]}


def two_responses(dialogue: dict, index: int) -> dict:
    """A PKU-SafeRLHF-like row: two responses and which one won (``"a"``/``"b"``), alternating positions."""
    a, b = (dialogue["chosen"], dialogue["rejected"]) if index % 2 == 0 else (dialogue["rejected"], dialogue["chosen"])
    return {"question": messages(dialogue["turns"]), "answer_a": a, "answer_b": b,
            "winner": "a" if index % 2 == 0 else "b"}


TWO_RESPONSE_COLUMNS = {"prompt": "question", "responses": ["answer_a", "answer_b"], "preferred": "winner",
                        "preferred_values": ["a", "b"]}


def deepspeed_chat(dialogue: dict) -> dict:
    """DeepSpeed-Chat's ``rm-static`` row: an HH prompt ending in ``Assistant:``, bare replies."""
    return {"prompt": render_prompt(dialogue["turns"]), "response": " " + dialogue["chosen"],
            "chosen": " " + dialogue["chosen"], "rejected": " " + dialogue["rejected"]}


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
