"""The experience maker: rollout, scoring, KL, advantages - everything before the update.

Phases (each timed as ``timing/<phase>``): ``generate`` samples responses with ``generate``; ``score``
runs one forward pass each of the policy, the reference, the critic and the reward model over the
prompt + response sequences; ``advantages`` reparameterises scores, folds the KL penalty into the
per-token rewards and runs GAE.

A buffer is ``(B, P + R)``: prompts left-padded to the longest prompt, responses right-padded to the longest
response. Every forward over it is a ``training.forward.ResponseForward`` (packed or padded, the model's own
logits; the policy's and the reference's divided by the sampling temperature).

Truncated responses: a response that reaches ``max_new_tokens`` without EOS is scored by the reward model as
a finished reply, with EOS appended - the sequence the RM was trained on and the one evaluation scores when it
encodes a response's text (``as_scored``) - and ``Experience.truncated`` marks it (for ``missing_eos_penalty``
and the ``response/truncated_fraction`` monitor).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from rlhf_pipeline.generation import SamplingConfig, response_mask_of, sample_responses, stop_token_ids
from rlhf_pipeline.rl import ppo_max as F
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.training.devices import synchronize
from rlhf_pipeline.training.engine import all_ranks_sum
from rlhf_pipeline.training.forward import ResponseForward, positions


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
    old_logprobs: torch.Tensor  # (B, R) log π_old of the sampled tokens (tempered logits)
    ref_logprobs: torch.Tensor  # (B, R) log π_ref (tempered logits)
    old_values: torch.Tensor  # (B, R) V_old(s_t)
    raw_scores: torch.Tensor  # (B,) reward-model scores
    truncated: torch.Tensor  # (B,) bool: the response reached max_new_tokens without EOS
    scores: torch.Tensor | None = None  # (B,) reparameterised scores
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate to the reference
    rewards: torch.Tensor | None = None  # (B, R) KL-shaped per-token rewards
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    turn_cut: torch.Tensor | None = None  # (B,) bool: cut where it began a new turn (generation.cut_at_turns)

    @property
    def prompt_width(self) -> int:
        """P: the width of the left-padded prompt block of ``sequences``, where the responses start."""
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> Experience:
        """The rollouts at ``index`` (a mini-batch)."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})


@torch.no_grad()
def make_experience(policy, reference, critic, reward_model, tokenizer, prompt_ids: list[list[int]],
                    sampling: SamplingConfig, timings: dict[str, float], generator=None,
                    forward_batch_size: int | None = None, packing: bool = True) -> Experience:
    """Roll out ``prompt_ids`` with ``generator`` (a whole-weight copy of ``policy``, or ``policy`` itself)
    and score the rollouts (no advantages yet), ``forward_batch_size`` rows per scoring forward pass.
    Prompts must leave room for ``max_new_tokens + 1`` positions: a truncated response is scored with EOS."""
    with timer("generate", timings):
        prompt, prompt_mask, response, turn_cut = sample_responses(generator or policy, tokenizer, prompt_ids,
                                                                   sampling)
    with timer("score", timings):
        stops = stop_token_ids(policy, tokenizer)
        response_mask = response_mask_of(response, stops, tokenizer.pad_token_id)
        exp = score_rollouts(policy, reference, critic, reward_model, prompt, prompt_mask, response, response_mask,
                             tokenizer.eos_token_id, stops, forward_batch_size=forward_batch_size, packing=packing,
                             temperature=sampling.temperature)
    exp.turn_cut = turn_cut
    return exp


def as_scored(response: torch.Tensor, response_mask: torch.Tensor, stop_ids: list[int], eos_token_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The responses as the reward model scores them, ending in the tokenizer's EOS as the replies it was trained
    on (and the ones evaluation encodes) do: ``(response, response_mask)`` one column wider ``(B, R + 1)``, and
    ``truncated`` ``(B,)``. A response cut at the cap without a stop token gets EOS appended; one that stopped
    at another stop token (e.g. Llama-3's ``<|eot_id|>``) ends in EOS instead of it."""
    lengths = response_mask.sum(dim=1)
    last = response.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    stopped = torch.isin(last, torch.tensor(stop_ids, device=last.device))
    truncated = ~stopped & (lengths > 0)
    scored = torch.cat([response, response.new_full((len(response), 1), eos_token_id)], dim=1)
    scored_mask = torch.cat([response_mask, response_mask.new_zeros((len(response), 1))], dim=1)
    rows = truncated.nonzero(as_tuple=True)[0]
    scored[rows, lengths[rows]] = eos_token_id
    scored_mask[rows, lengths[rows]] = 1
    other = (stopped & (last != eos_token_id)).nonzero(as_tuple=True)[0]
    scored[other, lengths[other] - 1] = eos_token_id
    return scored, scored_mask, truncated


@torch.no_grad()
def score_rollouts(policy, reference, critic, reward_model, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                   response: torch.Tensor, response_mask: torch.Tensor, eos_token_id: int, stop_ids: list[int], *,
                   forward_batch_size: int | None = None, packing: bool = True,
                   temperature: float = 1.0) -> Experience:
    """One forward pass of each model over the rollouts, ``forward_batch_size`` rows at a time, packed or
    padded; the policy's and reference's log-probs read ``softmax(logits / temperature)``, the distribution
    the rollouts were sampled from (see the module docstring for truncated responses)."""
    sequences = torch.cat([prompt, response], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    scored, scored_mask, truncated = as_scored(response, response_mask, stop_ids, eos_token_id)
    scored_sequences = torch.cat([prompt, scored], dim=1)
    scored_attention = torch.cat([prompt_mask, scored_mask], dim=1)
    position_ids, scored_positions = positions(attention_mask), positions(scored_attention)
    parts = []
    for rows in torch.arange(len(response), device=response.device).split(forward_batch_size or len(response)):
        forward = ResponseForward(sequences[rows], attention_mask[rows], position_ids[rows],
                                  response_mask[rows], packing)
        rm_forward = ResponseForward(scored_sequences[rows], scored_attention[rows], scored_positions[rows],
                                     scored_mask[rows], packing)
        parts.append((forward.scatter(forward.token_logprobs(policy, temperature)),
                      forward.scatter(forward.token_logprobs(reference, temperature)),
                      forward.scatter(forward.token_values(critic)),
                      rm_forward.last_values(reward_model)))
    old_logprobs, ref_logprobs, old_values, raw_scores = (torch.cat(part) for part in zip(*parts, strict=True))
    return Experience(sequences, attention_mask, position_ids, response_mask.float(), old_logprobs,
                      ref_logprobs, old_values, raw_scores, truncated)


def merge_moments(moments: F.RunningMoments, values: torch.Tensor) -> None:
    """Update the running score moments with this step's scores of every rank."""
    # on the scores' device: an NCCL group all-reduces GPU tensors only
    values = values.double()
    stats = torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device), values.sum(),
                         (values**2).sum()])
    count, total, squares = all_ranks_sum(stats, values.device).tolist()
    mean = total / count
    moments.update(count, mean, squares - count * mean**2)


def compute_advantages(exp: Experience, cfg: PPOConfig, moments: F.RunningMoments) -> Experience:
    """Reparameterise scores (the moments see the RM's raw scores; ``missing_eos_penalty`` then lowers those of
    truncated responses), fold the KL penalty into per-token rewards, run GAE and whiten."""
    merge_moments(moments, exp.raw_scores)
    scores = exp.raw_scores
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * exp.truncated.to(scores.dtype)
    if cfg.score_reparam == "normalise":
        exp.scores = F.normalise_and_clip_scores(scores, moments.mean, moments.std, cfg.score_clip)
    elif cfg.score_reparam == "scale":
        exp.scores = scores / (moments.std + F.EPS)
    else:
        exp.scores = scores
    exp.kl = F.kl_estimate(exp.old_logprobs, exp.ref_logprobs, cfg.kl_estimator) * exp.response_mask
    exp.rewards = F.kl_shaped_rewards(exp.scores, exp.kl, exp.response_mask, cfg.kl_coef)
    exp.advantages, exp.returns = F.gae(exp.rewards, exp.old_values, exp.response_mask, cfg.gamma, cfg.lam)
    if cfg.advantage_normalisation:
        exp.advantages = F.masked_whiten(exp.advantages, exp.response_mask)
    if cfg.advantage_clip is not None:
        exp.advantages = exp.advantages.clamp(-cfg.advantage_clip, cfg.advantage_clip)
    return exp
