"""The epoch/micro-batch loop shared by the SFT and reward-model trainers."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from rlhf_pipeline.training.engine import (
    LogFn,
    OptimConfig,
    grad_norm,
    init_distributed,
    make_engine,
    release_engine,
    world,
)


def micro_batches(num_items: int, micro_batch_size: int, epochs: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """``(epoch, indices)`` of this rank's micro-batches: a fresh seeded shuffle per epoch, sharded by rank.
    Every rank gets as many micro-batches (the shuffle wraps around to fill the last ranks' shards): a rank
    with one fewer would leave the others waiting in the gradient all-reduce."""
    rank, world_size = world()
    for epoch in range(epochs):
        order = list(range(num_items))
        random.Random(seed + epoch).shuffle(order)
        order += order[:-num_items % world_size]
        shard = order[rank::world_size]
        for start in range(0, len(shard), micro_batch_size):
            yield epoch, shard[start:start + micro_batch_size]


def accumulation_windows(num_items: int, cfg: OptimConfig, epochs: int, seed: int
                         ) -> Iterator[tuple[int, list[list[int]]]]:
    """``(epoch, micro-batches)`` of each optimiser step: ``cfg.grad_accum`` consecutive micro-batches of an
    epoch (``micro_batches``), the last window of an epoch holding what is left."""
    batches = micro_batches(num_items, cfg.micro_batch_size, epochs, seed)
    for epoch, group in itertools.groupby(batches, key=lambda batch: batch[0]):
        epoch_batches = [indices for _, indices in group]
        for start in range(0, len(epoch_batches), cfg.grad_accum):
            yield epoch, epoch_batches[start:start + cfg.grad_accum]


def optimizer_steps(num_items: int, epochs: int, cfg: OptimConfig) -> int:
    """Optimiser steps that ``train_loop`` takes: one per window of ``accumulation_windows``."""
    _, world_size = world()
    per_rank = math.ceil(num_items / world_size)
    return epochs * math.ceil(math.ceil(per_rank / cfg.micro_batch_size) / cfg.grad_accum)


CountFn = Callable[[Sequence[int]], dict[str, float]]
LossFn = Callable[[object, Sequence[int]], tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]], int]]


def train_loop(
    model, num_items: int, epochs: int, seed: int, cfg: OptimConfig, count_fn: CountFn, loss_fn: LossFn,
    log: LogFn, description: str, evaluate: Callable[[int], None] | None = None, eval_every: int = 0,
):
    """Train ``model`` through a DeepSpeed engine, one optimiser step per window of ``cfg.grad_accum``
    micro-batches (``accumulation_windows``; an epoch's last window steps however short it is).

    The loss is a mean over units (response tokens, preference pairs): ``count_fn(indices)`` gives a
    micro-batch's number of each unit, known before any forward pass, and ``loss_fn(engine, indices) ->
    (terms, metrics, n_tokens)`` its loss summed over each unit (``terms``, keyed as the counts), diagnostics
    as ``(sum, count)`` pairs and its real tokens. The step follows the gradient of Σ_unit (window sum / window
    count) with the counts summed over every data-parallel rank, so it does not depend on how the window is
    split into micro-batches or ranks; a unit with no items in the window contributes nothing.

    Logs every optimiser step: ``train/loss`` (this rank's window loss), each metric's Σsum/Σcount over the
    window, the step's learning rate, gradient norm and tokens/s. Returns the trained module.
    """
    if cfg.zero_stage == 3:
        raise ValueError("optim.zero_stage: SFT and reward-model training return whole models and run ZeRO 0-2; "
                         "for models that need partitioned weights use gradient_checkpointing and "
                         "extra_ds_config offload_optimizer (ZeRO-3 is supported in PPO)")
    init_distributed()
    torch.manual_seed(seed + world()[0])  # dropout draws do not depend on what ran before in this process
    total_steps = optimizer_steps(num_items, epochs, cfg)
    engine = make_engine(model, cfg, total_steps)
    rank, world_size = world()
    progress = tqdm(total=total_steps, desc=description, disable=rank != 0)
    for epoch, window in accumulation_windows(num_items, cfg, epochs, seed):
        started = time.perf_counter()
        engine.train()
        counts = [count_fn(indices) for indices in window]
        units = list(counts[0])
        local = [sum(count[unit] for count in counts) for unit in units]
        window_counts = torch.tensor(local, dtype=torch.float64, device=engine.device)
        torch.distributed.all_reduce(window_counts)
        # DeepSpeed averages the gradients over the ranks and, at its accumulation of 1 (``deepspeed_config``),
        # does not divide by the number of micro-batches: scaling each summed term by world_size / its
        # all-rank window count makes the accumulated gradient exactly that of the all-rank window mean
        scale = {unit: world_size / max(n, 1.0) for unit, n in zip(units, window_counts.tolist(), strict=True)}
        term_sums = dict.fromkeys(units, 0.0)
        metric_sums: dict[str, list[float]] = {}  # name -> [sum, count]
        tokens = 0
        for number, indices in enumerate(window):
            terms, metrics, n_tokens = loss_fn(engine, indices)
            engine.set_gradient_accumulation_boundary(number == len(window) - 1)  # the last backward reduces
            engine.backward(sum(terms[unit] * scale[unit] for unit in units))
            tokens += n_tokens
            for unit in units:
                term_sums[unit] += terms[unit].item()
            for key, (value, count) in metrics.items():
                metric_sums.setdefault(key, [0.0, 0.0])
                metric_sums[key][0] += value
                metric_sums[key][1] += count
        lr = engine.get_lr()[0]  # the scheduler moves on in engine.step()
        engine.step()
        step = engine.global_steps
        logged = {key: value / max(count, 1.0) for key, (value, count) in metric_sums.items()}
        window_loss = sum(term_sums[unit] / max(n, 1.0) for unit, n in zip(units, local, strict=True))
        logged.update({"train/loss": window_loss, "train/lr": lr, "train/grad_norm": grad_norm(engine),
                       "train/tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9),
                       "train/epoch": float(epoch)})
        log(logged, step)
        progress.update(1)
        progress.set_postfix(loss=f"{logged['train/loss']:.3f}")
        if evaluate and eval_every and step % eval_every == 0:
            evaluate(step)
    progress.close()
    engine.eval()
    return release_engine(engine)
