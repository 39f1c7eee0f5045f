"""Reward-model training: pairwise ranking loss, optional LM loss on the chosen response, and metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlhf_pipeline.formatting import DialogueEncoder, Encoded
from rlhf_pipeline.modeling import ValueHeadModel
from rlhf_pipeline.training.batching import (
    TokenBatch,
    collate,
    score_encoded,
)
from rlhf_pipeline.training.engine import LogFn, OptimConfig, no_logging
from rlhf_pipeline.training.forward import ResponseForward
from rlhf_pipeline.training.loop import train_loop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardConfig:
    """Reward-model training settings (the judge uses them too)."""

    epochs: int = 1
    """Passes over the preference pairs."""
    max_length: int = 128
    """Tokens per prompt + response (capped by the model's positions); longer prompts lose their oldest turns."""
    lm_loss_coef: float = 0.0
    """β of the LM loss on the chosen response (paper 1.0, release 0)."""
    margin: float = 0.0
    """Required score gap m in -log σ(r_chosen - r_rejected - m)."""
    score_l2_coef: float = 0.0
    """Penalty on squared scores, keeps them centred (0 = off)."""
    eval_batch_size: int = 64
    """Pairs per scoring batch (validation accuracy, score statistics)."""
    seed: int = 0
    """Seeds the value head, the shuffle of each epoch and dropout."""
    packing: bool = True
    """Pack each micro-batch's pairs into rows without padding (see ``training.forward``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser, schedule and DeepSpeed settings."""


def pairwise_ranking_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss -E[log σ(r_chosen - r_rejected - margin)] (paper §3.1)."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margin).mean()


def ranking_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher."""
    return (chosen_scores > rejected_scores).float().mean().item()


@torch.no_grad()
def score_responses(model: ValueHeadModel, encoder: DialogueEncoder, prompts: list[str], responses: list[str],
                    max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores of (prompt, response) pairs ``(N,)``; NaN for a pair that cannot fit the context."""
    device = next(model.parameters()).device
    model.eval()
    rows = encoder.encode_many(prompts, [[r] for r in responses], max_length)

    def score(batch: TokenBatch) -> torch.Tensor:
        return ResponseForward.of_tokens(batch.to(device), packed=True).last_values(model)

    return score_encoded(rows, encoder.tokenizer.pad_token_id, batch_size, score)


def encode_preferences(encoder: DialogueEncoder, prompts: list[str], chosen: list[str], rejected: list[str],
                       max_length: int) -> tuple[list[Encoded], dict[str, int]]:
    """Pairs that fit the context (one prompt cut for both responses, EOS kept), and the counts of
    pairs dropped, truncated, and made identical by truncation (dropped too: they teach nothing)."""
    rows = encoder.encode_many(prompts, [list(pair) for pair in zip(chosen, rejected, strict=True)], max_length)
    counts = rows.counts("pairs")
    kept = [rows.rows[i] for i in rows.kept]
    distinct = [row for row in kept if row.response_ids[0] != row.response_ids[1]]
    counts["pairs_identical_after_truncation"] = len(kept) - len(distinct)
    return distinct, counts


def train_reward_model(
    model: ValueHeadModel, encoder: DialogueEncoder, prompts: list[str], chosen: list[str], rejected: list[str],
    cfg: RewardConfig, log: LogFn = no_logging, description: str = "reward_model",
) -> tuple[ValueHeadModel, dict[str, int]]:
    """Train the scalar head (and the LM under it) on preference pairs; returns it and the fitting counts
    (``description`` names the progress bar)."""
    pairs, counts = encode_preferences(encoder, prompts, chosen, rejected, cfg.max_length)
    if counts["pairs_dropped"] or counts["pairs_truncated"]:
        logger.warning("Reward model: %s of %d pairs (context %d tokens)", counts, len(prompts), encoder.limit(cfg.max_length))
    if not pairs:
        raise ValueError(f"reward_model: no pair fits in {encoder.limit(cfg.max_length)} tokens; raise reward_model.max_length")
    pad = encoder.tokenizer.pad_token_id

    def count_fn(indices):
        counts = {"pairs": float(len(indices))}
        if cfg.lm_loss_coef > 0:  # the chosen responses' tokens, which the LM term reads
            counts["chosen_tokens"] = float(sum(len(pairs[i].response_ids[0]) for i in indices))
        return counts

    def loss_fn(engine, indices):
        rows = [pairs[i] for i in indices]
        # chosen and rejected in one forward pass: rows [0, B) chosen, [B, 2B) rejected
        batch = collate([(row.prompt_ids + row.response_ids[k], len(row.prompt_ids)) for k in (0, 1) for row in rows],
                        pad).to(engine.device)
        n = len(indices)
        batch.response_mask[n:] = 0  # the LM term reads the chosen responses only
        forward = ResponseForward.of_tokens(batch, cfg.packing)
        if cfg.lm_loss_coef > 0:
            scores, logprobs = forward.last_values_and_token_logprobs(engine)
        else:
            scores = forward.last_values(engine)
        chosen_scores, rejected_scores = scores.chunk(2)
        # sums over the micro-batch's pairs (the score penalty: each pair's two squared scores halved), so that
        # train_loop's division by the window's pairs makes the pair-weighted mean of the paper's per-pair loss
        ranking = pairwise_ranking_loss(chosen_scores, rejected_scores, cfg.margin) * n
        pair_loss = ranking + cfg.score_l2_coef * (scores**2).sum() / 2
        metrics = {"train/ranking_loss": (ranking.item(), n),
                   "train/accuracy": (ranking_accuracy(chosen_scores, rejected_scores) * n, n),
                   "train/margin": ((chosen_scores - rejected_scores).sum().item(), n)}
        terms = {"pairs": pair_loss}
        if cfg.lm_loss_coef > 0:  # a token-weighted mean over the window's chosen responses
            terms["chosen_tokens"] = -cfg.lm_loss_coef * logprobs.sum()
            metrics["train/lm_loss"] = (-logprobs.sum().item(), float(len(logprobs)))
        return terms, metrics, int(batch.attention_mask.sum())

    return train_loop(model, len(pairs), cfg.epochs, cfg.seed, cfg.optim, count_fn, loss_fn, log,
                      description), counts
