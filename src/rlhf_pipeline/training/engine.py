"""DeepSpeed engine set-up shared by every trainer.

One code path for a laptop and a GPU cluster: the model is wrapped by ``deepspeed.initialize`` with
ZeRO, AdamW, global gradient clipping and a warm-up/decay schedule (a torch ``LambdaLR``) from an
``OptimConfig``. Without a launcher the process joins a one-rank process group (gloo on CPU, nccl on GPU),
so tests run what a GPU run runs.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf_pipeline.adapters import enable_gradient_checkpointing
from rlhf_pipeline.training.devices import (
    adamw_params,
    backend,
    bf16_supported,
    rank_device,
    release_device_memory,
)

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


def no_logging(metrics: dict[str, float], step: int) -> None:
    """A ``LogFn`` that drops the metrics (core code never needs a tracker)."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and DeepSpeed settings of one trained model."""

    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's β1, β2."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_ratio: float = 0.1
    """Share of the T optimiser steps spent in linear warm-up, in [0, 1]: W = floor(warmup_ratio · T) steps.
    Step k (1-based) runs at ``lr · k/W`` for k ≤ W, then decays linearly from the peak, step P = max(W, 1),
    towards 0 at the step after the last: ``lr · (T + 1 - k) / (T + 1 - P)``. No step runs at lr 0: the first
    is at lr/W (at lr when W = 0: no warm-up) and the last at lr/(T + 1 - P). It is Hugging Face's
    ``get_linear_schedule_with_warmup`` moved one step later, so that step 1 is not at 0, and with the decay
    starting at the peak so that the peak is not repeated. E.g. T = 4: W = 2 gives lr · [1/2, 1, 2/3, 1/3],
    W = 0 gives lr · [1, 3/4, 1/2, 1/4]."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (none), 1 (optimiser state), 2 (+ gradients), 3 (+ parameters) sharded."""
    micro_batch_size: int = 16
    """Rows per forward/backward on each rank (PPO sets its own, see ``rl.config.engine_optims``)."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up to one optimiser step (the training loops accumulate them)."""
    bf16: str = "auto"
    """``auto`` (on a GPU that supports it), ``true`` or ``false``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: memory for ~one extra forward pass of compute."""
    extra_ds_config: dict = field(default_factory=dict)
    """Merged over the generated DeepSpeed config (e.g. offload settings)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch_size and grad_accum must be >= 1")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        object.__setattr__(self, "betas", tuple(self.betas))


def bf16_enabled(setting: str | bool) -> bool:
    """Whether ``OptimConfig.bf16`` turns bf16 on: ``auto`` where ``bf16_supported``; otherwise only ``true``
    (in any case, or ``True``)."""
    if str(setting).lower() == "auto":
        return bf16_supported()
    return str(setting).lower() == "true"


def free_port() -> int:
    """A TCP port that is free on this host now (the OS picks it): a one-rank group's, a launched stage's (two
    stages launched at once get different ones) or a test server's."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group, or make a one-rank group when run without a launcher."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:  # not started by the deepspeed launcher: a one-rank group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend=backend(), verbose=False)


DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "CROSS_RANK", "CROSS_SIZE")


def child_environment() -> dict[str, str]:
    """This process's environment without its process-group variables, for a child that forms its own group."""
    return {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_ranks_sum(value: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``value`` summed over the ranks (itself on one rank), on ``device`` (NCCL reduces GPU tensors only)."""
    if world()[1] == 1:
        return value
    total = value.detach().to(device=device, dtype=torch.float64).clone()
    torch.distributed.all_reduce(total)
    return total.to(value.dtype)


def deepspeed_config(cfg: OptimConfig) -> dict:
    """The DeepSpeed config for ``cfg``. It has no scheduler (``make_engine`` hands DeepSpeed one) and an
    accumulation of 1: the trainers accumulate micro-batches themselves, marking the last backward of each
    optimiser step with ``set_gradient_accumulation_boundary`` and weighting each micro-batch by its share of
    the step, so DeepSpeed neither divides the loss by an accumulation count nor steps on its own."""
    adamw = adamw_params(cfg.lr, cfg.betas, cfg.weight_decay)
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": adamw,
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16_enabled(cfg.bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, cfg.extra_ds_config)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """W = floor(warmup_ratio · total_steps); the tolerance keeps e.g. 0.29 · 100 = 28.999… at 29."""
    return math.floor(cfg.warmup_ratio * total_steps + 1e-9)


def warmup_decay(warmup: int, total_steps: int) -> Callable[[int], float]:
    """The lr multiplier of ``OptimConfig.warmup_ratio``'s schedule for ``LambdaLR``: called with the number
    of optimiser steps already taken, it returns the factor of the step about to be taken. Steps past
    ``total_steps`` keep the last step's factor rather than reaching 0.

    Raises:
        ValueError: unless 0 <= warmup <= total_steps and total_steps >= 1.
    """
    if total_steps < 1 or not 0 <= warmup <= total_steps:
        raise ValueError(f"schedule: need 0 <= warmup ({warmup}) <= total_steps ({total_steps}), total_steps >= 1")
    peak = max(warmup, 1)

    def factor(taken: int) -> float:
        step = min(taken + 1, total_steps)  # 1-based
        if step <= warmup:
            return step / warmup
        return (total_steps + 1 - step) / (total_steps + 1 - peak)

    return factor


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base`` key by key at every depth: ``{"zero_optimization":
    {"offload_optimizer": ...}}`` adds to the generated ZeRO section instead of replacing its ``stage``."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def make_engine(model: nn.Module, cfg: OptimConfig, total_steps: int):
    """Wrap ``model`` in a DeepSpeed engine (ZeRO, AdamW, gradient clipping) whose checkpoints load with
    ``weights_only=True``, with the warm-up/decay schedule of ``cfg.warmup_ratio`` over ``total_steps``: the
    optimiser steps this engine will take (an engine planned to take none gets a one-step schedule).
    ``engine.get_lr()`` is the lr of the next step."""
    import deepspeed

    from rlhf_pipeline.training.checkpointing import use_weights_only_checkpoints

    init_distributed()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    total_steps = max(1, total_steps)
    factor = warmup_decay(warmup_steps(cfg, total_steps), total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
        # a callable: DeepSpeed builds the optimiser from the config and hands it over
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
    )
    use_weights_only_checkpoints(engine)
    return engine


FROZEN_PLACEMENTS = ("device", "zero3", "zero3_offload")


def make_frozen_engine(model: nn.Module, placement: str, bf16: bool):
    """A frozen model (reference, reward model) for inference only: ``device`` keeps it whole on this rank's
    device; ``zero3`` partitions its parameters across the ranks (gathered layer by layer in each forward);
    ``zero3_offload`` keeps them in CPU memory and streams them to the device. Returns the callable to run."""
    import deepspeed

    if placement not in FROZEN_PLACEMENTS:
        raise ValueError(f"frozen_models: unknown {placement!r}; valid: {', '.join(FROZEN_PLACEMENTS)}")
    model = model.eval().requires_grad_(False)
    if placement == "device":
        return model.to(rank_device(), dtype=torch.bfloat16 if bf16 else None)
    init_distributed()
    engine, *_ = deepspeed.initialize(model=model, config=frozen_ds_config(placement, bf16))
    engine.eval()
    return engine


def frozen_ds_config(placement: str, bf16: bool) -> dict | None:
    """The DeepSpeed config of a frozen model's engine (None for ``device``: no engine)."""
    if placement == "device":
        return None
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "cpu" if placement == "zero3_offload" else "none", "pin_memory": True}}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "steps_per_print": 10**9}


@contextmanager
def partitioned_loading(ds_config: dict | None) -> Iterator[None]:
    """Inside, transformers' ``from_pretrained`` builds models under ``deepspeed.zero.Init`` for a ZeRO-3
    ``ds_config``: each rank reads the checkpoint into its own partition of every weight and never holds the
    whole model (at 8B in bf16, 16 GB of host memory per model per rank saved). Below stage 3 (or None) models
    load whole, as their engines hold them. Everything in the context must run on every rank (the loading
    gathers each layer once)."""
    if not ds_config or ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    init_distributed()
    # transformers reads the config through a weak reference: this object must outlive the loading
    hf_config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later models (the whole generation copy) build as usual
        del hf_config


def resident_parameters(model: nn.Module) -> tuple[int, int]:
    """``(held, total)`` parameter elements of ``model``: ``held`` is this rank's partition under ZeRO-3."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def load_whole_weights(engine, target: nn.Module) -> None:
    """Copy the engine's model weights into ``target``, a whole model of the same architecture (its persistent
    buffers too). Under ZeRO-3 each parameter is gathered, copied and released in turn, so the device never holds
    a second whole copy beside ``target``; every rank must call this (it gathers)."""
    import deepspeed

    partitioned = engine.zero_optimization_partition_weights()
    target_state = target.state_dict()  # shares storage with target's parameters and buffers
    with torch.no_grad():
        for name, parameter in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([parameter], enabled=partitioned):
                target_state[name].copy_(parameter)
        for name, buffer in engine.module.named_buffers():
            if name in target_state:  # non-persistent buffers (e.g. rotary frequencies) stay as target built them
                target_state[name].copy_(buffer)


def release_engine(engine) -> nn.Module:
    """The engine's module, freed of the engine: its optimizer state and gradient buffers go, and so does the
    device memory cached for them (in a Kedro run, SFT's optimizer state would otherwise stay on the GPU
    through RM and PPO training). DeepSpeed's forward hooks on the module would keep the whole engine alive."""
    module = engine.module
    engine.destroy()  # the optimizer's gradient hooks
    for handle in (getattr(engine, "module_forward_pre_hook", None), getattr(engine, "module_forward_post_hook", None)):
        if handle is not None:
            handle.remove()
    del engine
    release_device_memory()
    return module


def grad_norm(engine) -> float:
    """Global gradient norm of the last optimiser step (before clipping)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
