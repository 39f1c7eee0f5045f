"""Reward-model training: pairwise ranking loss, optional LM loss on the chosen response, and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlhf_pipeline.modeling import ValueHeadModel
from rlhf_pipeline.training.batching import TokenBatch, batch_pairs, masked_token_nll
from rlhf_pipeline.training.engine import LogFn, OptimConfig, no_logging
from rlhf_pipeline.training.loop import train_loop


@dataclass(frozen=True)
class RewardConfig:
    epochs: int = 1
    max_length: int = 128
    lm_loss_coef: float = 0.0
    """β of the LM loss on the chosen response (paper 1.0, release 0)."""
    margin: float = 0.0
    """Required score gap m in -log σ(r_chosen - r_rejected - m)."""
    score_l2_coef: float = 0.0
    """Penalty on squared scores, keeps them centred (0 = off)."""
    eval_batch_size: int = 64
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)


def pairwise_ranking_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss -E[log σ(r_chosen - r_rejected - margin)] (paper §3.1)."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margin).mean()


def ranking_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher."""
    return (chosen_scores > rejected_scores).float().mean().item()


def last_token_scores(values: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """The value head at each sequence's last real token (its EOS): the reward ``(B,)``."""
    return values.gather(1, batch.last_index.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def score_responses(model: ValueHeadModel, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                    batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores of (prompt, response) pairs ``(N,)``."""
    device = next(model.parameters()).device
    model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = batch_pairs(tokenizer, prompts[start:start + batch_size], responses[start:start + batch_size], max_length).to(device)
        values, _ = model(batch.input_ids, batch.attention_mask)
        scores.append(last_token_scores(values, batch).float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def train_reward_model(
    model: ValueHeadModel, tokenizer, prompts: list[str], chosen: list[str], rejected: list[str],
    cfg: RewardConfig, log: LogFn = no_logging,
) -> ValueHeadModel:
    """Train the scalar head (and the LM under it) on preference pairs."""

    def loss_fn(engine, indices):
        batch_prompts = [prompts[i] for i in indices]
        # chosen and rejected in one forward pass: rows [0, B) chosen, [B, 2B) rejected
        batch = batch_pairs(tokenizer, batch_prompts * 2, [chosen[i] for i in indices] + [rejected[i] for i in indices],
                            cfg.max_length).to(engine.device)
        values, logits = engine(batch.input_ids, batch.attention_mask, return_lm_logits=cfg.lm_loss_coef > 0)
        scores = last_token_scores(values, batch)
        chosen_scores, rejected_scores = scores.float().chunk(2)
        ranking = pairwise_ranking_loss(chosen_scores, rejected_scores, cfg.margin)
        loss = ranking + cfg.score_l2_coef * (scores.float() ** 2).mean()
        metrics = {"train/ranking_loss": ranking.item(), "train/accuracy": ranking_accuracy(chosen_scores, rejected_scores),
                   "train/margin": (chosen_scores - rejected_scores).mean().item()}
        if cfg.lm_loss_coef > 0:
            n = len(indices)
            total, count = masked_token_nll(logits[:n], batch.input_ids[:n], batch.response_mask[:n])
            lm_loss = total / count.clamp(min=1.0)
            loss = loss + cfg.lm_loss_coef * lm_loss
            metrics["train/lm_loss"] = lm_loss.item()
        metrics["train/loss"] = loss.item()
        return loss, metrics, int(batch.attention_mask.sum())

    return train_loop(model, len(prompts), cfg.epochs, cfg.seed, cfg.optim, loss_fn, log, "reward_model")
