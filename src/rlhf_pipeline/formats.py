"""Read the data layouts people hold into the canonical HH dialogue that every stage reads.

A source holds one *kind* of row:

* ``preference`` (reward modelling, and by default every other stage): ``Preference(prompt, chosen, rejected)``;
* ``instruction`` (SFT demonstrations): ``Demonstration(prompt, response)``;
* ``prompt`` (PPO rollouts, evaluation): ``PromptRow(prompt)``.

``prompt`` is always the canonical dialogue of ``hh.render_prompt`` (``"\\n\\nHuman: ...\\n\\nAssistant:"``),
responses are the final assistant turn, stripped; ``model.prompt_format`` later decides how the model sees the
turns (the raw text, or the tokenizer's chat template).

Formats (``FORMATS``; ``auto`` detects one from each file's first row whose fields fit, and logs which):

* ``hh``: Anthropic HH-RLHF transcripts, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``.
* ``standard``: TRL's standard rows, plain strings. Preference: ``{"prompt", "chosen", "rejected"}``, or an implicit
  prompt (``{"chosen", "rejected"}`` sharing it as a prefix, split as TRL's ``extract_prompt`` does). A prompt
  written as HH text (DeepSpeed-Chat's ``rm-static``) keeps its turns. Instruction: ``{"prompt", "completion"}``.
  Prompt: ``{"prompt"}``.
* ``conversational``: TRL's conversational rows, message lists (``role``/``content``, or ShareGPT's
  ``from``/``value``). Preference: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}``, a
  response list that repeats the prompt, or an implicit prompt (the lists' common prefix). Instruction:
  ``{"messages": [...]}`` (the last assistant turn is the response) or ``{"prompt": [...], "completion": [...]}``.
  Prompt: ``{"prompt": [...]}`` or ``{"messages": [...]}`` ending with a user turn. ``system`` messages are
  prepended to the first user turn (``system: keep``) or dropped (``system: drop``).

``columns`` maps these field names to a source's own columns before parsing (``{"prompt": "history"}``), and
picks ``chosen``/``rejected`` from two response columns by a preference column: ``{"responses": [a, b],
"preferred": col, "preferred_values": [value picking a, value picking b]}`` (PKU-SafeRLHF, SHP).

A record that does not fit raises ``ValueError`` with the reason; ``data.parse_rows`` reads a source's raw rows
through here, naming each bad row's source and line, so that a caller either stops (strict mode) or quarantines
the row: nothing is dropped silently. Every format's turns and replies pass ``hh``'s checks of a valid dialogue
(``hh.check_turns``, ``hh.check_text``: alternating, non-empty turns; encodable text without control characters or
special-token text; no turn marker inside a turn).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhf_pipeline.hh import (
    check_no_marker,
    check_not_serialised,
    check_text,
    check_turns,
    hh_prompt_response,
    render_prompt,
    split_turns,
)

logger = logging.getLogger(__name__)

KINDS = ("preference", "instruction", "prompt")
FORMATS = ("auto", "hh", "standard", "conversational")
ROLES = {"user": "Human", "human": "Human", "assistant": "Assistant", "gpt": "Assistant", "system": "system"}
@dataclass(frozen=True)
class Preference:
    """One validated preference pair."""

    prompt: str  # canonical dialogue, ends with "\n\nAssistant:"
    chosen: str  # final assistant turn preferred by the annotator, stripped
    rejected: str  # the other final assistant turn, stripped


@dataclass(frozen=True)
class Demonstration:
    """One validated SFT demonstration."""

    prompt: str  # canonical dialogue, ends with "\n\nAssistant:"
    response: str  # the assistant's reply, stripped


@dataclass(frozen=True)
class PromptRow:
    """One validated prompt (PPO rollouts, evaluation)."""

    prompt: str  # canonical dialogue, ends with "\n\nAssistant:"


@dataclass(frozen=True)
class SourceFormat:
    """How to read one source.

    Attributes:
        kind: One of ``KINDS``.
        format: One of ``FORMATS``.
        columns: Canonical field -> the source's column, plus ``responses``/``preferred``/``preferred_values``.
        system: ``keep`` (prepend system messages to the first user turn) or ``drop``.
    """

    kind: str = "preference"
    format: str = "auto"
    columns: Mapping[str, Any] = field(default_factory=dict)
    system: str = "keep"

    def __post_init__(self) -> None:
        """Raises ``ValueError`` naming the setting for an unknown kind, format, system mode or column key."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.format not in FORMATS:
            raise ValueError(f"format: unknown {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.system not in ("keep", "drop"):
            raise ValueError(f"system: unknown {self.system!r}; valid: keep, drop")
        valid = {"prompt", "chosen", "rejected", "completion", "messages", "responses", "preferred",
                 "preferred_values"}
        unknown = set(self.columns) - valid
        if unknown:
            raise ValueError(f"columns: unknown key(s) {sorted(unknown)}; valid: {sorted(valid)}")
        if ("responses" in self.columns) != ("preferred" in self.columns):
            raise ValueError("columns: 'responses' (two response columns) and 'preferred' (the column that picks "
                             "one) go together")
        if "responses" in self.columns and len(self.columns["responses"]) != 2:
            raise ValueError(f"columns.responses: two columns, got {list(self.columns['responses'])}")
        values = self.columns.get("preferred_values")
        if values is not None and ("responses" not in self.columns or len(values) != 2 or values[0] == values[1]):
            raise ValueError(f"columns.preferred_values: two different values (picking the first and the second of "
                             f"columns.responses), got {values!r}")


# --- detection ---------------------------------------------------------------------------------------------------
def detect_format(record: Mapping[str, Any], kind: str) -> str | None:
    """The format of a (column-mapped) record of ``kind`` from its fields and their types; None if none fits."""
    if "chosen" in record and "rejected" in record:
        chosen = record["chosen"]
        if any(isinstance(record.get(name), list) for name in ("prompt", "chosen", "rejected")):
            return "conversational"
        if isinstance(chosen, str):
            return "standard" if "prompt" in record or not _is_hh(chosen) else "hh"
        return None
    if kind == "preference":
        return None
    if "messages" in record:
        return "conversational"
    if "prompt" in record and (kind == "prompt" or "completion" in record):
        return "conversational" if isinstance(record["prompt"], list) else "standard"
    return None


def _is_hh(text: str) -> bool:
    try:
        return split_turns(text)[0][0] == "Human"
    except ValueError:
        return False


# --- turns and their checks ----------------------------------------------------------------------------------------
def message_turns(messages: Any, where: str, system: str) -> list[tuple[str, str]]:
    """``(speaker, text)`` turns of a message list (``role``/``content`` or ``from``/``value``)."""
    if not isinstance(messages, list):
        raise ValueError(f"{where} is {type(messages).__name__}, not a list of messages")
    turns, system_text = [], []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: message {number} is {type(message).__name__}, not an object")
        role, content = message.get("role", message.get("from")), message.get("content", message.get("value"))
        if role not in ROLES:
            raise ValueError(f"{where}: message {number} has role {role!r}; valid: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {number} content is {type(content).__name__}, not a string")
        if ROLES[role] == "system":
            check_text(content, where)
            system_text.append(content.strip())
        else:
            turns.append((ROLES[role], content.strip()))
    if system == "keep" and system_text and turns and turns[0][0] == "Human":
        turns[0] = ("Human", "\n\n".join([*system_text, turns[0][1]]))
    return turns


def text_turns(text: Any, where: str) -> list[tuple[str, str]]:
    """Turns of a prompt string: HH text keeps its turns (its open ``Assistant:`` turn removed); plain text is
    one ``Human`` turn."""
    if not isinstance(text, str):
        raise ValueError(f"{where} is {type(text).__name__}, not a string")
    check_not_serialised(text, where)
    if not _is_hh(text):
        return [("Human", text.strip())]
    turns = split_turns(text)
    return turns[:-1] if turns[-1] == ("Assistant", "") else turns


def prompt_of(turns: list[tuple[str, str]], where: str) -> str:
    """The canonical prompt of turns that end with a ``Human`` turn (checked)."""
    check_turns(turns, where)
    if turns[-1][0] != "Human":
        raise ValueError(f"{where}: the prompt does not end with a 'Human:' turn")
    return render_prompt(turns)


def response_of(turns: list[tuple[str, str]], where: str) -> str:
    """The text of a response given as turns: exactly one ``Assistant`` turn, not empty, checked."""
    if len(turns) != 1 or turns[0][0] != "Assistant":
        raise ValueError(f"{where}: a response must be one assistant turn, got {[s for s, _ in turns]}")
    if not turns[0][1]:
        raise ValueError(f"{where}: empty response")
    check_not_serialised(turns[0][1], where)
    check_text(turns[0][1], where)
    check_no_marker(turns[0][1], where)
    return turns[0][1]


# --- the formats ---------------------------------------------------------------------------------------------------
def _require(record: Mapping[str, Any], *fields: str) -> None:
    missing = [name for name in fields if name not in record]
    if missing:
        raise ValueError(f"missing field {', '.join(map(repr, missing))} (fields present: {sorted(record)})")


def _strings(record: Mapping[str, Any], *fields: str) -> None:
    for name in fields:
        if not isinstance(record[name], str):
            raise ValueError(f"field '{name}' is {type(record[name]).__name__}, not a string (message lists are the "
                             f"'conversational' format)")


def _hh(record: Mapping[str, Any], kind: str, system: str) -> Preference:
    _require(record, "chosen", "rejected")
    _strings(record, "chosen", "rejected")
    (prompt, chosen), (other, rejected) = (hh_prompt_response(record[name], f"field '{name}'")
                                           for name in ("chosen", "rejected"))
    if prompt != other:
        raise ValueError("'chosen' and 'rejected' differ before the final 'Assistant:' turn")
    return _pair(prompt, chosen, rejected)


def _common_prefix(chosen: str, rejected: str) -> int:
    """Characters of the implicit prompt: the common prefix, cut back to its last whitespace so that no word is
    split between prompt and reply (TRL's ``extract_prompt`` cuts at the first differing character, which gives
    ``"I like ca"`` → ``"ts"``/``"rs"``); 0 when the prefix holds no whitespace."""
    index = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
                 min(len(chosen), len(rejected)))
    return max(chosen.rfind(" ", 0, index + 1), chosen.rfind("\n", 0, index + 1), 0)


def _standard(record: Mapping[str, Any], kind: str, system: str) -> Preference | Demonstration | PromptRow:
    if kind == "prompt":
        _require(record, "prompt")
        _strings(record, "prompt")
        return PromptRow(prompt_of(text_turns(record["prompt"], "field 'prompt'"), "field 'prompt'"))
    if kind == "instruction":
        _require(record, "prompt", "completion")
        _strings(record, "prompt", "completion")
        prompt = prompt_of(text_turns(record["prompt"], "field 'prompt'"), "field 'prompt'")
        return Demonstration(prompt, response_of([("Assistant", record["completion"].strip())], "field 'completion'"))
    _require(record, "chosen", "rejected")
    if "prompt" in record:
        _strings(record, "prompt", "chosen", "rejected")
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    else:
        _strings(record, "chosen", "rejected")
        cut = _common_prefix(record["chosen"], record["rejected"])
        if not record["chosen"][:cut].strip():
            raise ValueError("no 'prompt' field and 'chosen' and 'rejected' share no words before they differ (an "
                             "implicit prompt)")
        prompt, chosen, rejected = record["chosen"][:cut], record["chosen"][cut:], record["rejected"][cut:]
    responses = [response_of([("Assistant", text.strip())], f"field '{name}'")
                 for name, text in (("chosen", chosen), ("rejected", rejected))]
    return _pair(prompt_of(text_turns(prompt, "field 'prompt'"), "field 'prompt'"), *responses)


def _pair(prompt: str, chosen: str, rejected: str) -> Preference:
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' responses are identical")
    return Preference(prompt, chosen, rejected)


def _conversational(record: Mapping[str, Any], kind: str, system: str) -> Preference | Demonstration | PromptRow:
    def turns(name: str) -> list[tuple[str, str]]:
        value = record[name]
        return text_turns(value, f"field '{name}'") if isinstance(value, str) else message_turns(
            value, f"field '{name}'", system)

    def after(prompt: list[tuple[str, str]], name: str) -> str:
        if isinstance(record[name], str):  # a reply as plain text beside a message-list prompt
            return response_of([("Assistant", record[name].strip())], f"field '{name}'")
        response = turns(name)
        if response[:len(prompt)] == prompt:  # a response list that repeats the prompt (e.g. UltraFeedback)
            response = response[len(prompt):]
        return response_of(response, f"field '{name}'")

    if kind == "prompt":
        name = "prompt" if "prompt" in record else "messages"
        _require(record, name)
        return PromptRow(prompt_of(turns(name), f"field '{name}'"))
    if kind == "instruction":
        if "messages" in record and "completion" not in record:
            messages = turns("messages")
            if not messages or messages[-1][0] != "Assistant":
                raise ValueError("field 'messages': the conversation does not end with an assistant turn")
            return Demonstration(prompt_of(messages[:-1], "field 'messages'"),
                                 response_of(messages[-1:], "field 'messages'"))
        _require(record, "prompt", "completion")
        prompt = turns("prompt")
        return Demonstration(prompt_of(prompt, "field 'prompt'"), after(prompt, "completion"))
    _require(record, "chosen", "rejected")
    if "prompt" in record:
        prompt = turns("prompt")
    else:  # implicit prompt: the common prefix of the two conversations
        chosen, rejected = turns("chosen"), turns("rejected")
        length = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
                      min(len(chosen), len(rejected)))
        prompt = chosen[:length]
        if prompt and prompt[-1][0] == "Assistant":  # both conversations end with the same assistant turn
            prompt = prompt[:-1]
    return _pair(prompt_of(prompt, "the prompt"), after(prompt, "chosen"), after(prompt, "rejected"))


PARSERS = {"hh": _hh, "standard": _standard, "conversational": _conversational}


def apply_columns(record: Mapping[str, Any], columns: Mapping[str, Any]) -> dict[str, Any]:
    """The record with the source's columns renamed to the canonical fields, and ``chosen``/``rejected`` picked from
    two response columns by the preference column (``preferred_values``: the values picking the first and the second
    response; default ``[0, 1]``)."""
    if not columns:
        return dict(record)
    renamed = {key: column for key, column in columns.items() if key not in ("responses", "preferred",
                                                                             "preferred_values")}
    missing = [column for column in [*renamed.values(), *columns.get("responses", []),
                                     *([columns["preferred"]] if "preferred" in columns else [])]
               if column not in record]
    if missing:
        raise ValueError(f"missing column(s) {missing} named by the column mapping (fields present: {sorted(record)})")
    out = {**record, **{key: record[column] for key, column in renamed.items()}}
    if "responses" in columns:
        values = list(columns.get("preferred_values", [0, 1]))
        preferred = record[columns["preferred"]]
        if preferred not in values:
            raise ValueError(f"column '{columns['preferred']}' is {preferred!r}; the mapping's preferred_values are "
                             f"{values} (picking {list(columns['responses'])})")
        first, second = (record[column] for column in columns["responses"])
        out["chosen"], out["rejected"] = (first, second) if preferred == values[0] else (second, first)
    return out


def parse_record(record: object, source: SourceFormat, fmt: str) -> Preference | Demonstration | PromptRow:
    """Validate one decoded record of ``source`` in format ``fmt`` (not ``auto``); raises ``ValueError`` with the
    reason."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    record = apply_columns(record, source.columns)
    if source.kind != "preference" and (fmt == "hh" or ("chosen" in record and "rejected" in record)):
        # a preference source serves every stage: its prompts, its chosen responses as demonstrations
        pair = PARSERS[fmt](record, "preference", source.system)
        return PromptRow(pair.prompt) if source.kind == "prompt" else Demonstration(pair.prompt, pair.chosen)
    return PARSERS[fmt](record, source.kind, source.system)



