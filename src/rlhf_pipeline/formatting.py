"""The one place that turns an HH dialogue into token ids that fit the model's context.

Every stage (SFT, reward modelling, PPO rollouts, PPO-ptx, evaluation) encodes through ``DialogueEncoder``:

* **Prompt formats.** ``hh`` keeps the raw ``\\n\\nHuman: ...\\n\\nAssistant:`` text (the tokenizer adds its
  BOS, if it has one); ``chat_template`` turns the HH turns into ``user``/``assistant`` messages for the
  tokenizer's own chat template (which brings its special tokens). A response is its tokens then EOS. Text of
  the data that reads like a special token (``"<|endoftext|>"``) is tokenised as plain text in either format
  (``split_special_tokens``; a chat template's turns are tokenised apart from its own text where that gives the
  template's own ids, as for byte-level BPE tokenizers), and ``hh.check_text`` quarantines such text before any stage.
* **Context budget.** The limit is ``min(max_length, model positions)``. A prompt too long for it loses
  its oldest turns, cut at a ``Human:`` turn so that the latest turns stay and the final ``Human:`` turn
  always survives. A training pair whose response does not fit even beside the final turn alone keeps the
  start of its response and its EOS (``truncated``); a row whose final turn leaves less than
  ``min_response_tokens`` is dropped (``None``), never a crash. Callers count both.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from rlhf_pipeline.hh import render_prompt, split_turns

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rlhf_pipeline.generation import SamplingConfig

PROMPT_FORMATS = ("hh", "chat_template")
PLACEHOLDER = "\ue000{}\ue001"  # private-use characters, which no chat template writes
PLACEHOLDERS = re.compile("\ue000(\\d+)\ue001")
PROBE = (("Human", "Hi there, how are you?"), ("Assistant", "Fine, thanks.\nAnd you?"), ("Human", "Say hi."))
ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Encoded:
    """One prompt with one or more responses (a preference pair shares one prompt cut)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]  # each ends with EOS
    truncated: bool  # a response lost tokens (its EOS kept)
    prompt_cut: bool  # the prompt lost its oldest turns


def context_length(config) -> int | None:
    """Positions the model can attend over (``n_positions``/``max_position_embeddings``), if it says."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class DialogueEncoder:
    """Encodes prompts and responses for one tokenizer, prompt format and context length."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: str = "hh", max_positions: int | None = None,
                 min_response_tokens: int = 8):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"model.prompt_format: unknown {prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")
        if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.prompt_format is chat_template but the tokenizer has no chat template; use hh")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: responses could never end")
        self.tokenizer, self.prompt_format = tokenizer, prompt_format
        self.max_positions, self.min_response_tokens = max_positions, min_response_tokens
        # Turns tokenised apart from the template give the template's own ids for byte-level BPE tokenizers; a
        # SentencePiece tokenizer that prefixes each piece with a space would not, and keeps whole-text encoding
        # (its data then relies on the special-token quarantine of ``hh.check_text``).
        self.turns_apart = prompt_format == "chat_template" and self._render_apart(PROBE) == self._render_whole(PROBE)
        if prompt_format == "chat_template" and not self.turns_apart:
            logger.warning("The chat template's turns cannot be tokenised apart from its text without changing the "
                           "ids; special-token text inside data is kept out by data_processing's quarantine only")

    def sampling(self, cfg: SamplingConfig) -> SamplingConfig:
        """``cfg`` with ``stop_at_turns`` decided by the prompt format where it is None: on in the ``hh`` format,
        where only a turn marker can tell that the policy went on to write the user's next turn (a chat template
        ends its turns with a stop token)."""
        return cfg if cfg.stop_at_turns is not None else replace(cfg, stop_at_turns=self.prompt_format == "hh")

    def limit(self, max_length: int) -> int:
        """Tokens a sequence may hold: the stage's ``max_length`` capped by the model's positions."""
        return min(max_length, self.max_positions) if self.max_positions else max_length

    # --- pieces ------------------------------------------------------------------------------------
    def render(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of a prompt made of ``turns`` (speaker, text) followed by an open assistant turn."""
        if self.prompt_format == "hh":
            return self.tokenizer(render_prompt(list(turns)), split_special_tokens=True)["input_ids"]
        return self._render_apart(turns) if self.turns_apart else self._render_whole(turns)

    def _render_whole(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        messages = [{"role": ROLES[speaker], "content": text} for speaker, text in turns]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render_apart(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        # The template's own text may hold special tokens; the turns' text is data and may not. Each turn enters
        # the template as a placeholder and is tokenised apart, its special-token text split into plain tokens.
        messages = [{"role": ROLES[speaker], "content": PLACEHOLDER.format(i)} for i, (speaker, _) in enumerate(turns)]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pieces = PLACEHOLDERS.split(text)  # template text, turn index, template text, ...
        if sorted(map(int, pieces[1::2])) != list(range(len(turns))):
            raise ValueError("the tokenizer's chat template does not show each message's content once; use "
                             "model.prompt_format: hh")
        ids = []
        for position, piece in enumerate(pieces):
            if position % 2:
                ids += self.tokenizer(turns[int(piece)][1], add_special_tokens=False,
                                      split_special_tokens=True)["input_ids"]
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    @staticmethod
    def turns_of(prompt: str) -> list[tuple[str, str]]:
        """The prompt's turns without its open ``Assistant:`` turn; the last one must be a ``Human:`` turn."""
        turns = split_turns(prompt)
        if turns and turns[-1] == ("Assistant", ""):
            turns = turns[:-1]  # the canonical prompt ends with the open "Assistant:" turn
        if not turns or turns[-1][0] != "Human":
            raise ValueError(f"prompt does not end with a 'Human:' turn: {prompt[-80:]!r}")
        return turns

    def prompt_candidates(self, prompt: str) -> list[list[int]]:
        """The prompt's encodings from whole to its final ``Human:`` turn alone, cut at ``Human:`` turns."""
        turns = self.turns_of(prompt)
        return [self.render(turns[start:]) for start, (speaker, _) in enumerate(turns) if speaker == "Human"]

    def response_ids(self, response: str) -> list[int]:
        """Token ids of a response and its EOS, tokenised apart from the prompt exactly as sampling sees it."""
        text = " " + response.strip() if self.prompt_format == "hh" else response.strip()
        return (self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                + [self.tokenizer.eos_token_id])

    # --- fitting -------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, budget: int) -> tuple[list[int], bool] | None:
        """The longest encoding of ``prompt`` (cut at a ``Human:`` turn) within ``budget`` tokens and whether
        it was cut; ``None`` when even the final ``Human:`` turn alone is longer."""
        whole = self.render_whole(prompt)
        if len(whole) <= budget:
            return whole, False
        fitting = next((ids for ids in self.prompt_candidates(prompt)[1:] if len(ids) <= budget), None)
        return (fitting, True) if fitting is not None else None

    def render_whole(self, prompt: str) -> list[int]:
        """Token ids of the whole prompt (the common case: no cut candidates are rendered)."""
        if self.prompt_format == "hh":  # the canonical text is already rendered: no need to split it
            return self.tokenizer(prompt, split_special_tokens=True)["input_ids"]
        return self.render(self.turns_of(prompt))

    def sampling_prompt(self, prompt: str, max_prompt_length: int, max_new_tokens: int) -> list[int] | None:
        """Prompt ids that leave room for ``max_new_tokens`` within the model's positions, or ``None``."""
        fitted = self.prompt_ids(prompt, self.limit(max_prompt_length + max_new_tokens) - max_new_tokens)
        return fitted[0] if fitted else None

    def encode(self, prompt: str, responses: Sequence[str], max_length: int) -> Encoded | None:
        """``prompt`` with each of ``responses`` within ``limit(max_length)`` tokens, or ``None`` if impossible."""
        limit = self.limit(max_length)
        response_ids = [self.response_ids(r) for r in responses]
        room = limit - max(len(ids) for ids in response_ids)  # for the prompt beside the longest response
        whole = self.render_whole(prompt)
        if len(whole) <= room:
            return Encoded(whole, response_ids, truncated=False, prompt_cut=False)
        candidates = self.prompt_candidates(prompt)  # rendered once, only for prompts that need a cut
        fitting = next((ids for ids in candidates[1:] if len(ids) <= room), None)
        if fitting is not None:
            return Encoded(fitting, response_ids, truncated=False, prompt_cut=True)
        room = limit - len(candidates[-1])  # for the response beside the final Human turn alone
        if room < self.min_response_tokens:
            return None
        eos = self.tokenizer.eos_token_id
        cut = [ids if len(ids) <= room else ids[: room - 1] + [eos] for ids in response_ids]
        return Encoded(candidates[-1], cut, truncated=True, prompt_cut=len(candidates) > 1)

    def encode_many(self, prompts: Sequence[str], responses: Sequence[Sequence[str]], max_length: int) -> EncodedRows:
        """Encode every row (``responses[i]`` are the responses of ``prompts[i]``) and count what did not fit."""
        rows = [self.encode(p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
        return EncodedRows(rows)


@dataclass
class EncodedRows:
    """Encoded rows in input order, ``None`` where a row cannot fit."""

    rows: list[Encoded | None]

    @property
    def kept(self) -> list[int]:
        """Indices of the rows that fit (not ``None``), in input order."""
        return [i for i, row in enumerate(self.rows) if row is not None]

    def counts(self, prefix: str) -> dict[str, int]:
        """``<prefix>_dropped`` (could not fit), ``_truncated`` (response cut) and ``_prompt_cut`` (turns dropped)."""
        kept = [row for row in self.rows if row is not None]
        return {f"{prefix}_dropped": len(self.rows) - len(kept),
                f"{prefix}_truncated": sum(row.truncated for row in kept),
                f"{prefix}_prompt_cut": sum(row.prompt_cut for row in kept)}
