"""Supervised fine-tuning: causal-LM loss on the response tokens only."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlhf_pipeline.training.batching import batch_pairs, masked_token_nll
from rlhf_pipeline.training.engine import LogFn, OptimConfig, no_logging
from rlhf_pipeline.training.loop import train_loop


@dataclass(frozen=True)
class SFTConfig:
    epochs: int = 3
    max_length: int = 128
    """Tokens per prompt + response; longer prompts lose their oldest turns."""
    eval_every: int = 50
    """Optimiser steps between held-out evaluations (0: only at the end)."""
    eval_batch_size: int = 64
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)


@torch.no_grad()
def evaluate_lm(model, tokenizer, prompts: list[str], responses: list[str], max_length: int, batch_size: int) -> dict[str, float]:
    """Held-out mean response-token loss and perplexity."""
    device = next(model.parameters()).device
    model.eval()
    nll_sum, count = 0.0, 0.0
    for start in range(0, len(prompts), batch_size):
        batch = batch_pairs(tokenizer, prompts[start:start + batch_size], responses[start:start + batch_size], max_length).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, n = masked_token_nll(logits, batch.input_ids, batch.response_mask)
        nll_sum, count = nll_sum + total.item(), count + n.item()
    loss = nll_sum / max(count, 1.0)
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}


def train_sft(
    model, tokenizer, prompts: list[str], responses: list[str], val_prompts: list[str], val_responses: list[str],
    cfg: SFTConfig, log: LogFn = no_logging,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Fine-tune ``model`` on (prompt, response) demonstrations; returns the model and held-out metrics."""

    def loss_fn(engine, indices):
        batch = batch_pairs(tokenizer, [prompts[i] for i in indices], [responses[i] for i in indices],
                            cfg.max_length).to(engine.device)
        logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, count = masked_token_nll(logits, batch.input_ids, batch.response_mask)
        loss = total / count.clamp(min=1.0)
        return loss, {"train/loss": loss.item()}, int(batch.attention_mask.sum())

    def evaluate(step: int) -> dict[str, float]:
        metrics = evaluate_lm(model, tokenizer, val_prompts, val_responses, cfg.max_length, cfg.eval_batch_size)
        log(metrics, step)
        return metrics

    model = train_loop(model, len(prompts), cfg.epochs, cfg.seed, cfg.optim, loss_fn, log, "sft",
                       evaluate if val_prompts else None, cfg.eval_every)
    return model, (evaluate_lm(model, tokenizer, val_prompts, val_responses, cfg.max_length, cfg.eval_batch_size)
                   if val_prompts else {})
