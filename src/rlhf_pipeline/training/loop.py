"""The epoch/micro-batch loop shared by the SFT and reward-model trainers."""

from __future__ import annotations

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


def optimizer_steps(num_items: int, epochs: int, cfg: OptimConfig) -> int:
    _, world_size = world()
    per_rank = math.ceil(num_items / world_size)
    return epochs * math.ceil(math.ceil(per_rank / cfg.micro_batch_size) / cfg.grad_accum)


def train_loop(
    model, num_items: int, epochs: int, seed: int, cfg: OptimConfig,
    loss_fn: Callable[[object, Sequence[int]], tuple[object, dict[str, float], int]],
    log: LogFn, description: str, evaluate: Callable[[int], None] | None = None, eval_every: int = 0,
):
    """Train ``model`` through a DeepSpeed engine; ``loss_fn(engine, indices) -> (loss, metrics, n_tokens)``.

    Logs every optimiser step: the mean of each metric over its micro-batches, learning rate, gradient
    norm and tokens/s. Returns the trained module.
    """
    if cfg.zero_stage == 3:
        raise ValueError("optim.zero_stage: SFT and reward-model training return whole models and run ZeRO 0-2; "
                         "for models that need partitioned weights use gradient_checkpointing and "
                         "extra_ds_config offload_optimizer (ZeRO-3 is supported in PPO)")
    init_distributed()
    torch.manual_seed(seed + world()[0])  # dropout draws do not depend on what ran before in this process
    total_steps = optimizer_steps(num_items, epochs, cfg)
    engine = make_engine(model, cfg, total_steps)
    rank, _ = world()
    sums: dict[str, float] = {}
    micro, tokens, started = 0, 0, time.perf_counter()
    progress = tqdm(total=total_steps, desc=description, disable=rank != 0)
    for epoch, indices in micro_batches(num_items, cfg.micro_batch_size, epochs, seed):
        engine.train()
        loss, metrics, n_tokens = loss_fn(engine, indices)
        engine.backward(loss)
        engine.step()
        micro, tokens = micro + 1, tokens + n_tokens
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
        if micro % cfg.grad_accum == 0:  # the engine just took an optimiser step
            step = engine.global_steps
            elapsed = time.perf_counter() - started
            logged = {key: value / micro for key, value in sums.items()}
            logged.update({"train/lr": engine.get_lr()[0], "train/grad_norm": grad_norm(engine),
                           "train/tokens_per_s": tokens / max(elapsed, 1e-9), "train/epoch": float(epoch)})
            log(logged, step)
            progress.update(1)
            progress.set_postfix(loss=f"{logged.get('train/loss', float('nan')):.3f}")
            sums, micro, tokens, started = {}, 0, 0, time.perf_counter()
            if evaluate and eval_every and step % eval_every == 0:
                evaluate(step)
    progress.close()
    engine.eval()
    return release_engine(engine)
