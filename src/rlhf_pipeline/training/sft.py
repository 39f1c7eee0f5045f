"""Supervised fine-tuning: causal-LM loss on the response tokens only."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from rlhf_pipeline.formatting import DialogueEncoder, EncodedRows
from rlhf_pipeline.training.batching import collate_encoded
from rlhf_pipeline.training.engine import LogFn, OptimConfig, no_logging
from rlhf_pipeline.training.forward import ResponseForward, encoded_logprob_sums
from rlhf_pipeline.training.loop import train_loop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig:
    """Settings of ``train_sft``: the ``params:sft`` keys other than those ``launch.stages.SFTSettings`` reads
    itself (``val_fraction``, ``gold_eval_prompts``, ``sampling``, ``launcher``)."""

    epochs: int = 3
    """Passes over the demonstrations."""
    max_length: int = 128
    """Tokens per prompt + response (capped by the model's positions); longer prompts lose their oldest turns."""
    eval_every: int = 50
    """Optimiser steps between held-out evaluations (0: only at the end)."""
    eval_batch_size: int = 64
    """Rows per held-out evaluation batch."""
    seed: int = 0
    """Seeds the shuffle of each epoch and dropout."""
    packing: bool = True
    """Pack each micro-batch's demonstrations into rows without padding (see ``training.forward``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser, schedule and DeepSpeed settings."""


def evaluate_lm(model, rows: EncodedRows, pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Held-out mean response-token loss and perplexity over the rows that fit."""
    logprobs, counts = encoded_logprob_sums(model, rows, pad_token_id, batch_size)
    loss = -logprobs.double().nansum().item() / max(counts.double().nansum().item(), 1.0)
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}


def train_sft(
    model, encoder: DialogueEncoder, prompts: list[str], responses: list[str], val_prompts: list[str],
    val_responses: list[str], cfg: SFTConfig, log: LogFn = no_logging,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Fine-tune ``model`` on (prompt, response) demonstrations; returns the model and metrics (held-out
    loss after and before training, and how many demonstrations were dropped, truncated or lost turns to
    fit the context). Each optimiser step descends the mean NLL over every response token of its
    ``grad_accum`` micro-batches, so a long demonstration weighs by its length."""
    pad = encoder.tokenizer.pad_token_id
    encoded = encoder.encode_many(prompts, [[r] for r in responses], cfg.max_length)
    val = encoder.encode_many(val_prompts, [[r] for r in val_responses], cfg.max_length)
    counts = {**encoded.counts("train"), **val.counts("val")}
    if counts["train_dropped"] or counts["train_truncated"]:
        logger.warning("SFT: %s of %d demonstrations (context %d tokens)", counts, len(prompts), encoder.limit(cfg.max_length))
    train_rows = [encoded.rows[i] for i in encoded.kept]
    if not train_rows:
        raise ValueError(f"sft: no demonstration fits in {encoder.limit(cfg.max_length)} tokens; raise sft.max_length")

    def count_fn(indices):
        return {"tokens": float(sum(len(train_rows[i].response_ids[0]) for i in indices))}

    def loss_fn(engine, indices):
        batch = collate_encoded([train_rows[i] for i in indices], pad).to(engine.device)
        forward = ResponseForward.of_tokens(batch, cfg.packing)
        return {"tokens": -forward.token_logprobs(engine).sum()}, {}, int(batch.attention_mask.sum())

    has_val = bool(val.kept)

    def evaluate(step: int) -> dict[str, float]:
        metrics = evaluate_lm(model, val, pad, cfg.eval_batch_size)
        log(metrics, step)
        return metrics

    # the held-out loss before training says what SFT bought where no gold reward exists (real data)
    before = {f"{k}_before": v for k, v in evaluate_lm(model, val, pad, cfg.eval_batch_size).items()} if has_val else {}
    model = train_loop(model, len(train_rows), cfg.epochs, cfg.seed, cfg.optim, count_fn, loss_fn, log,
                       "sft", evaluate if has_val else None, cfg.eval_every)
    metrics = evaluate_lm(model, val, pad, cfg.eval_batch_size) if has_val else {}
    return model, {**metrics, **before, **{k: float(v) for k, v in counts.items()}}
