"""Sampling from a causal LM with transformers' ``generate`` (left padding, KV cache, stop at EOS)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.hh import LINE_MARKER

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (the paper's: temperature 0.8, top-p 0.9, repetition penalty 1.1)."""

    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    do_sample: bool = True
    batch_size: int | None = None
    """Prompts per ``generate`` call (None: all at once). Prompts are grouped by length, so a call pads only
    to its own longest prompt."""
    cache_implementation: str | None = None
    """``static``: a pre-allocated KV cache, with which transformers compiles the decoding step on a GPU
    (``benchmarks/bench_gpu.py`` measures whether that wins); None: the dynamic cache."""
    stop_at_turns: bool | None = None
    """End a response where it starts a new ``Human:``/``Assistant:`` turn (``cut_at_turns``). None: by the prompt
    format (``DialogueEncoder.sampling``): on for ``hh``, where nothing else stops a policy that writes the user's
    next turn itself; off for a chat template, whose turns end with a stop token."""

    def __post_init__(self) -> None:
        """Raises ``ValueError`` naming the field for a setting ``generate`` would reject or that samples nothing,
        so that it fails when the config is built, not at the first ``generate`` after earlier stages trained."""
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1 (tokens sampled per response), "
                             f"got {self.max_new_tokens}")
        # > 0 even for greedy decoding: PPO divides the policy's and reference's logits by it when scoring
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}; for greedy decoding set "
                             f"do_sample: false (and keep temperature > 0: PPO scores with logits / temperature)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1] (1: no nucleus cut), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"sampling.repetition_penalty must be > 0 (1.0: no penalty), got "
                             f"{self.repetition_penalty}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"sampling.batch_size must be null (every prompt in one call) or >= 1, "
                             f"got {self.batch_size}")


def left_pad(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so that every response starts at the same column: ``(input_ids, attention_mask)``."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], cfg: SamplingConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per prompt (prompts already fitted to leave room for ``max_new_tokens``).

    Returns:
        ``prompt_input_ids`` (B, P) left-padded, ``prompt_attention_mask`` (B, P), ``response_ids`` (B, R)
            right-padded with the pad token after the first EOS (which is kept), and ``turn_cut`` (B,) bool: with
            ``cfg.stop_at_turns``, the responses cut where they began a new turn (``cut_at_turns``).
    """
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    # a sampled pad token would read as padding and punch a hole in the response mask
    suppress = list(model.generation_config.suppress_tokens or [])
    if tokenizer.pad_token_id not in stops:
        suppress.append(tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    by_length = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    size = cfg.batch_size or len(prompt_ids)
    parts = []
    for group in (by_length[start:start + size] for start in range(0, len(by_length), size)):
        input_ids, attention_mask = left_pad([prompt_ids[i] for i in group], tokenizer.pad_token_id)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
            temperature=cfg.temperature if cfg.do_sample else None, top_p=cfg.top_p if cfg.do_sample else None,
            top_k=0 if cfg.do_sample else None, repetition_penalty=cfg.repetition_penalty, eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id, suppress_tokens=suppress or None, use_cache=True,
            cache_implementation=cfg.cache_implementation,
            stop_strings=list(TURN_STOPS) if cfg.stop_at_turns else None,
            tokenizer=tokenizer if cfg.stop_at_turns else None,
        )
        parts.append((group, output[:, input_ids.shape[1]:]))
    model.train(was_training)
    input_ids, attention_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    response_ids = torch.full((len(prompt_ids), max(part.shape[1] for _, part in parts)), tokenizer.pad_token_id,
                              dtype=torch.long, device=device)
    for group, part in parts:
        response_ids[torch.tensor(group, device=device), :part.shape[1]] = part
    response_ids = mask_after_eos(response_ids, stops, tokenizer.pad_token_id)
    turn_cut = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    if cfg.stop_at_turns:
        response_ids, turn_cut = cut_at_turns(response_ids, tokenizer, stops)
    return input_ids.to(device), attention_mask.to(device), response_ids, turn_cut


# what ``generate`` watches for; ``cut_at_turns`` then cuts at the first ``hh.LINE_MARKER`` (a marker at a line start)
TURN_STOPS = ("\nHuman:", "\nAssistant:")


def cut_at_turns(response_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """End each response whose text begins a new ``Human:``/``Assistant:`` turn (``hh.LINE_MARKER``) at the
    token where the marker starts: that token becomes EOS and the rest padding, so PPO scores and trains on the
    reply up to the turn, ended as the reward model's training replies are (trlx stops HH rollouts the same
    way). A token holding text before the marker is dropped with it.

    Args:
        response_ids: ``(B, R)`` sampled tokens, padding after the first stop token.

    Returns:
        The cut ``response_ids`` ``(B, R)`` and ``turn_cut`` ``(B,)`` bool.
    """
    cut = response_ids.clone()
    turn_cut = torch.zeros(len(cut), dtype=torch.bool, device=cut.device)
    keep = (~after_first_stop(cut, stop_ids)).sum(dim=1).tolist()
    rows = cut.tolist()  # one device-to-host copy for the whole batch
    for row, length in enumerate(keep):
        ids = rows[row][:length]
        marker = LINE_MARKER.search(tokenizer.decode(ids, skip_special_tokens=True))
        if marker is None:
            continue
        # the first token whose prefix decodes past the marker's start (decoded length grows with the prefix)
        start = bisect.bisect_right(range(len(ids)), marker.start(),
                                    key=lambda k: len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)))
        cut[row, start] = tokenizer.eos_token_id
        cut[row, start + 1:] = tokenizer.pad_token_id
        turn_cut[row] = True
    return cut, turn_cut


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS (what training appends) and every EOS the model's
    ``generation_config`` names (e.g. Llama-3's ``<|eot_id|>`` beside ``<|end_of_text|>``)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


def after_first_stop(response_ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """True at the positions after each row's first stop token ``(B, R)``."""
    is_stop = torch.isin(response_ids, torch.tensor(list(stop_ids), device=response_ids.device))
    return (is_stop.cumsum(dim=1) - is_stop.long()) > 0


def mask_after_eos(response_ids: torch.Tensor, stop_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """Replace every token after the first EOS with padding (``generate`` may keep sampling other rows)."""
    return response_ids.masked_fill(after_first_stop(response_ids, stop_ids), pad_token_id)


def response_mask_of(response_ids: torch.Tensor, stop_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """1 for real response tokens up to and including the first EOS, 0 after it ``(B, R)``."""
    after_stop = after_first_stop(response_ids, stop_ids)
    if pad_token_id in stop_ids:  # padding is a stop token: only what follows the first one is padding
        return (~after_stop).long()
    return (~after_stop & (response_ids != pad_token_id)).long()


def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor) -> list[str]:
    """Response token ids ``(B, R)`` as text, one string per row: special tokens (EOS, a special pad token)
    skipped and surrounding whitespace stripped."""
    return [text.strip() for text in tokenizer.batch_decode(response_ids, skip_special_tokens=True)]


def fit_prompts(encoder: DialogueEncoder, prompts: list[str], max_prompt_length: int,
                max_new_tokens: int) -> tuple[list[int], list[list[int]]]:
    """Indices and token ids of the prompts that fit beside ``max_new_tokens`` (see ``formatting``)."""
    fitted = [encoder.sampling_prompt(p, max_prompt_length, max_new_tokens) for p in prompts]
    kept = [i for i, ids in enumerate(fitted) if ids is not None]
    if len(kept) < len(prompts):
        logger.warning("%d of %d prompt(s) cannot fit %d prompt + %d new tokens (model positions %s): dropped",
                       len(prompts) - len(kept), len(prompts), max_prompt_length, max_new_tokens, encoder.max_positions)
    return kept, [fitted[i] for i in kept]


def generate_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], cfg: SamplingConfig,
    batch_size: int = 32, seed: int = 0,
) -> list[str]:
    """Responses (text) to fitted prompts (``fit_prompts``), sampled ``batch_size`` at a time with a fixed seed."""
    if not prompt_ids:
        return []
    torch.manual_seed(seed)
    _, _, response_ids, turn_cut = sample_responses(model, tokenizer, prompt_ids, replace(cfg, batch_size=batch_size))
    if cfg.stop_at_turns:
        logger.info("%d of %d response(s) cut where they began a new turn", int(turn_cut.sum()), len(turn_cut))
    return decode_responses(tokenizer, response_ids)
