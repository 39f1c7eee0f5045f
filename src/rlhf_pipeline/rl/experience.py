"""The experience maker: rollout, scoring, KL, advantages - everything before the update.

Phases (each timed as ``timing/<phase>``): ``generate`` samples responses with ``generate``; ``score``
runs one forward pass each of the policy, the reference, the critic and the reward model over the
prompt + response sequences; ``advantages`` reparameterises scores, folds the KL penalty into the
per-token rewards and runs GAE.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from rlhf_pipeline.generation import SamplingConfig, response_mask_of, sample_responses, stop_token_ids
from rlhf_pipeline.training.devices import synchronize


@contextmanager
def timer(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Add the phase's wall-clock seconds to ``timings``; GPU work it queued is waited for at both ends, so
    that it is counted in this phase and not the next."""
    synchronize()
    started = time.perf_counter()
    yield
    synchronize()
    timings[f"timing/{name}"] = timings.get(f"timing/{name}", 0.0) + time.perf_counter() - started


@dataclass
class Experience:
    """One buffer of rollouts. P: prompt width (left-padded), R: response width."""

    sequences: torch.Tensor  # (B, P+R) prompt then response token ids
    attention_mask: torch.Tensor  # (B, P+R)
    position_ids: torch.Tensor  # (B, P+R) positions that skip left padding, as in generate
    response_mask: torch.Tensor  # (B, R) 1 up to and including EOS
    logprobs: torch.Tensor  # (B, R) log π_old of the sampled tokens
    ref_logprobs: torch.Tensor  # (B, R) log π_ref
    values: torch.Tensor  # (B, R) V_old(s_t)
    raw_scores: torch.Tensor  # (B,) reward-model scores
    scores: torch.Tensor | None = None  # (B,) reparameterised scores
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate to the reference
    rewards: torch.Tensor | None = None  # (B, R) KL-shaped per-token rewards
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)

    @property
    def prompt_width(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> Experience:
        """The rollouts at ``index`` (a mini-batch)."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logits(model, sequences, attention_mask, position_ids, prompt_width: int) -> torch.Tensor:
    """Logits that predict each response token (B, R, V): position t−1 predicts token t. Only those
    positions go through the LM head (``logits_to_keep``): the prompt's logits are never needed."""
    width = sequences.shape[1] - prompt_width
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=width + 1, use_cache=False).logits
    return logits[:, :-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits`` (B, R)."""
    return gather_tokens(torch.log_softmax(logits.float(), dim=-1), tokens)


def gather_tokens(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) read from a log-softmax over the vocabulary (B, R, V) -> (B, R)."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_values(value_model, sequences, attention_mask, position_ids, prompt_width: int) -> torch.Tensor:
    """V(s_t) for each response token t, read where the token is predicted (B, R)."""
    values, _ = value_model(sequences, attention_mask, position_ids=position_ids)
    return values[:, prompt_width - 1 : -1].float()


@torch.no_grad()
def make_experience(policy, reference, critic, reward_model, tokenizer, prompt_ids: list[list[int]],
                    sampling: SamplingConfig, timings: dict[str, float], generator=None,
                    forward_batch_size: int | None = None) -> Experience:
    """Roll out ``prompt_ids`` with ``generator`` (a whole-weight copy of ``policy``, or ``policy`` itself)
    and score the rollouts (no advantages yet), ``forward_batch_size`` rows per scoring forward pass."""
    with timer("generate", timings):
        prompt, prompt_mask, response = sample_responses(generator or policy, tokenizer, prompt_ids, sampling)
    with timer("score", timings):
        response_mask = response_mask_of(response, stop_token_ids(policy, tokenizer), tokenizer.pad_token_id)
        sequences = torch.cat([prompt, response], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        position_ids = positions(attention_mask)
        width = prompt.shape[1]
        last = width + (response_mask.sum(dim=1) - 1).clamp(min=0)  # the EOS (or last) response token
        scored = []
        for rows in torch.arange(len(sequences)).split(forward_batch_size or len(sequences)):
            args = (sequences[rows], attention_mask[rows], position_ids[rows], width)
            rm_values, _ = reward_model(args[0], args[1], position_ids=args[2])
            scored.append((token_logprobs(response_logits(policy, *args), response[rows]),
                           token_logprobs(response_logits(reference, *args), response[rows]),
                           response_values(critic, *args),
                           rm_values.float().gather(1, last[rows].unsqueeze(1)).squeeze(1)))
        logprobs, ref_logprobs, values, raw_scores = (torch.cat(parts) for parts in zip(*scored, strict=True))
    return Experience(sequences, attention_mask, position_ids, response_mask.float(), logprobs, ref_logprobs,
                      values * response_mask, raw_scores)
