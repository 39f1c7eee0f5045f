"""The experience maker: rollout, scoring, KL, advantages - everything before the update.

Phases (each timed as ``timing/<phase>``): ``generate`` samples responses with ``generate``; ``score``
runs one forward pass each of the policy, the reference, the critic and the reward model over the
prompt + response sequences; ``advantages`` reparameterises scores, folds the KL penalty into the
per-token rewards and runs GAE.

Padding-free passes: a buffer is ``(B, P + R)`` - prompts left-padded to the longest prompt, responses
right-padded to the longest response - and most of it is padding when lengths vary. With packing on, every
forward (scoring chunk, PPO micro-batch) packs its rows' real tokens into bins as wide as its longest row,
one row after another with position ids restarting at each (``PackedLayout``): transformers confines
attention to each packed row (flash-attention's varlen kernels where installed), so every token gets the
padded pass's output, while the padding and post-EOS positions are not computed (``ResponseForward``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from rlhf_pipeline.adapters import AdaptersOff
from rlhf_pipeline.generation import SamplingConfig, response_mask_of, sample_responses, stop_token_ids
from rlhf_pipeline.training.batching import PackedLayout
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
    """log p(token) under ``logits`` (..., V) -> (...)."""
    return gather_tokens(torch.log_softmax(logits.float(), dim=-1), tokens)


def gather_tokens(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) read from a log-softmax over the vocabulary (..., V) -> (...)."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class ResponseForward:
    """One forward pass over rows of a buffer, padded or packed (``PackedLayout``), and where its outputs for
    the response tokens are: ``token_*`` methods return them flat ``(K, ...)`` in row-major order over the
    response mask, and ``scatter`` puts a flat ``(K,)`` tensor back into ``(B, R)`` with zeros after each EOS."""

    def __init__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 response_mask: torch.Tensor, packed: bool):
        self.shape = response_mask.shape
        self.prompt_width = sequences.shape[1] - response_mask.shape[1]
        mask = response_mask.bool()
        self.rows, self.cols = mask.nonzero(as_tuple=True)
        self.tokens = sequences[:, self.prompt_width:][mask]
        self.packed = packed
        if not packed:
            self.inputs = {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids}
            self.mask = mask
            self.last = mask.sum(dim=1) - 1
            return
        real = attention_mask.bool()
        layout = PackedLayout.of(attention_mask)
        self.inputs = {"input_ids": layout.pack(sequences, real), "attention_mask": None,
                       "position_ids": layout.positions()}
        first_response = layout.starts + layout.lengths - mask.sum(dim=1)  # flat index of each response's start
        self.predictors = first_response[self.rows] + self.cols - 1  # the position before a token predicts it
        self.last = layout.starts + layout.lengths - 1

    @classmethod
    def of(cls, exp: Experience, packed: bool) -> ResponseForward:
        return cls(exp.sequences, exp.attention_mask, exp.position_ids, exp.response_mask, packed)

    @property
    def computed_tokens(self) -> int:
        return self.inputs["input_ids"].numel()

    def token_logits(self, model) -> torch.Tensor:
        """The logits that predict each response token ``(K, V)``; only those positions go through the LM head."""
        if not self.packed:
            return response_logits(model, self.inputs["input_ids"], self.inputs["attention_mask"],
                                   self.inputs["position_ids"], self.prompt_width)[self.mask]
        # the model's own forward (engines, adapters and ZeRO hooks included), then its LM head on the positions
        hidden = model(**self.inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]
        return output_embeddings(model)(hidden.reshape(-1, hidden.shape[-1])[self.predictors])

    def token_values(self, value_model) -> torch.Tensor:
        """V(s_t) for each response token, read where the token is predicted ``(K,)``."""
        values = self.forward_values(value_model)
        if not self.packed:
            return values[:, self.prompt_width - 1 : -1][self.mask]
        return values.reshape(-1)[self.predictors]

    def last_values(self, value_model) -> torch.Tensor:
        """The value head at each row's last response token (its EOS, or the last one at the cap) ``(B,)``."""
        values = self.forward_values(value_model)
        if not self.packed:
            return values[:, self.prompt_width:].gather(1, self.last.clamp(min=0).unsqueeze(1)).squeeze(1)
        return values.reshape(-1)[self.last]

    def forward_values(self, value_model) -> torch.Tensor:
        values, _ = value_model(self.inputs["input_ids"], self.inputs["attention_mask"],
                                position_ids=self.inputs["position_ids"])
        return values.float()

    def scatter(self, flat: torch.Tensor) -> torch.Tensor:
        out = flat.new_zeros(self.shape)
        out[self.rows, self.cols] = flat
        return out


def output_embeddings(model) -> torch.nn.Module:
    """The LM head of a model, a DeepSpeed engine around one, or a frozen view (``AdaptersOff``)."""
    if isinstance(model, AdaptersOff):
        model = model.model
    return getattr(model, "module", model).get_output_embeddings()  # a DeepSpeed engine holds its model as .module


@torch.no_grad()
def make_experience(policy, reference, critic, reward_model, tokenizer, prompt_ids: list[list[int]],
                    sampling: SamplingConfig, timings: dict[str, float], generator=None,
                    forward_batch_size: int | None = None, packing: bool = True) -> Experience:
    """Roll out ``prompt_ids`` with ``generator`` (a whole-weight copy of ``policy``, or ``policy`` itself)
    and score the rollouts (no advantages yet), ``forward_batch_size`` rows per scoring forward pass."""
    with timer("generate", timings):
        prompt, prompt_mask, response = sample_responses(generator or policy, tokenizer, prompt_ids, sampling)
    with timer("score", timings):
        response_mask = response_mask_of(response, stop_token_ids(policy, tokenizer), tokenizer.pad_token_id)
        exp = score_rollouts(policy, reference, critic, reward_model, prompt, prompt_mask, response, response_mask,
                             forward_batch_size, packing)
    return exp


@torch.no_grad()
def score_rollouts(policy, reference, critic, reward_model, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                   response: torch.Tensor, response_mask: torch.Tensor, forward_batch_size: int | None = None,
                   packing: bool = True) -> Experience:
    """One forward pass of each model over the rollouts, ``forward_batch_size`` rows at a time, packed or
    padded (see the module docstring)."""
    sequences = torch.cat([prompt, response], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    parts = []
    for rows in torch.arange(len(response), device=response.device).split(forward_batch_size or len(response)):
        forward = ResponseForward(sequences[rows], attention_mask[rows], positions(attention_mask[rows]),
                                  response_mask[rows], packing)
        parts.append((forward.scatter(token_logprobs(forward.token_logits(policy), forward.tokens)),
                      forward.scatter(token_logprobs(forward.token_logits(reference), forward.tokens)),
                      forward.scatter(forward.token_values(critic)),
                      forward.last_values(reward_model)))
    logprobs, ref_logprobs, values, raw_scores = (torch.cat(part) for part in zip(*parts, strict=True))
    return Experience(sequences, attention_mask, positions(attention_mask), response_mask.float(), logprobs,
                      ref_logprobs, values, raw_scores)
