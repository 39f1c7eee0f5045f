"""Evaluation metrics of a policy on held-out prompts (no kedro): win rates, KL, perplexity, diversity, refusals."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.training.batching import TokenBatch, score_encoded
from rlhf_pipeline.training.forward import response_logprob_sums


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """Share of pairs where ``scores`` beats ``baseline_scores``, ties counting one half; nan pairs are skipped."""
    pairs = [(a, b) for a, b in zip(scores, baseline_scores, strict=True) if not (math.isnan(a) or math.isnan(b))]
    if not pairs:
        return math.nan
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams of ``texts`` (1 = no repetition)."""
    ngrams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


@torch.no_grad()
def response_logprobs(model, encoder: DialogueEncoder, prompts: list[str], responses: list[str], max_length: int,
                      batch_size: int = 16, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each response (EOS included) under ``softmax(logits / temperature)`` of
    ``model`` and its token count, ``(N,)`` each; NaN for a pair that cannot fit the context."""
    device = next(model.parameters()).device
    model.eval()

    def logprob_and_count(batch: TokenBatch) -> torch.Tensor:
        return torch.stack(response_logprob_sums(model, batch.to(device), temperature=temperature), dim=1)

    rows = encoder.encode_many(prompts, [[r] for r in responses], max_length)
    out = score_encoded(rows, encoder.tokenizer.pad_token_id, batch_size, logprob_and_count)
    return out[:, 0], out[:, 1]


def kl_and_perplexity(policy, reference, encoder: DialogueEncoder, prompts: list[str], responses: list[str],
                      max_length: int, temperature: float = 1.0) -> dict[str, float]:
    """KL(π‖π_ref) per sequence, estimated (k1) on the policy's own samples, and the policy's perplexity of them;
    both read the distributions at the sampling ``temperature`` the responses were drawn with, as PPO does."""
    policy_logp, counts = response_logprobs(policy, encoder, prompts, responses, max_length, temperature=temperature)
    reference_logp = policy_logp if policy is reference else response_logprobs(
        reference, encoder, prompts, responses, max_length, temperature=temperature)[0]
    fits = ~policy_logp.isnan()
    policy_logp, counts, reference_logp = policy_logp[fits], counts[fits], reference_logp[fits]
    return {"kl_to_sft": (policy_logp - reference_logp).mean().item(),
            "perplexity": math.exp(min(-policy_logp.sum().item() / max(counts.sum().item(), 1.0), 50.0))}
