"""Devices, done once: which device this rank uses, how models get there, and which optimiser kernel runs.

Nothing else in the project calls ``torch.cuda`` directly. Under the ``deepspeed`` launcher each rank uses
``cuda:LOCAL_RANK``; without it, ``cuda`` (device 0) when there is a GPU; otherwise the CPU.
"""

from __future__ import annotations

import gc
import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU (``torch.cuda.is_available()``)."""
    return torch.cuda.is_available()


def rank_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on a GPU machine, the CPU otherwise."""
    if not has_cuda():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def to_rank_device(model: nn.Module) -> nn.Module:
    """Move a model that no engine owns (the frozen reference and reward model, a model to sample or
    score) to this rank's device, in place."""
    return model.to(rank_device())


def bf16_supported() -> bool:
    """Whether bf16 can be used here: on a CUDA GPU that supports it (never on the CPU)."""
    return has_cuda() and torch.cuda.is_bf16_supported()


def backend() -> str:
    """The process-group backend: nccl between GPUs, gloo on CPUs."""
    return "nccl" if has_cuda() else "gloo"


def synchronize() -> None:
    """Wait for queued GPU work, so that a wall-clock timer measures the phase that queued it."""
    if has_cuda():
        torch.cuda.synchronize()


def release_device_memory() -> None:
    """Collect unreachable objects and hand the GPU memory cached for them back to the driver, so that
    another process (a launched PPO rank) can use it."""
    gc.collect()
    if has_cuda():
        torch.cuda.empty_cache()


def fused_adam_available() -> bool:
    """Whether DeepSpeed's FusedAdam can run here: prebuilt into the DeepSpeed install, or JIT-buildable,
    which needs a CUDA toolkit (a pip-installed torch has none: the build dies with ``CUDA_HOME does not exist``)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(installed_ops.get("fused_adam")) or CUDA_HOME is not None


def adamw_params(lr: float, betas: tuple[float, float], weight_decay: float) -> dict:
    """DeepSpeed ``AdamW`` parameters: FusedAdam on a GPU where it can run, else torch's fused AdamW."""
    params = {"lr": lr, "betas": list(betas), "weight_decay": weight_decay}
    if has_cuda() and fused_adam_available():
        logger.info("Optimiser: DeepSpeed FusedAdam")
        return params
    logger.info("Optimiser: torch AdamW (fused kernel)%s", " - FusedAdam is neither prebuilt nor buildable (no nvcc)"
                if has_cuda() else "")
    return {**params, "torch_adam": True, "fused": True}


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU and (where present) this rank's CUDA RNG states, for a checkpoint."""
    state = {"torch_rng": torch.get_rng_state()}
    if has_cuda():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore the RNG states that ``rng_state`` returned (a checkpoint's): the CPU's, and this rank's CUDA state
    where there is a GPU and ``state`` holds one."""
    torch.set_rng_state(state["torch_rng"])
    if has_cuda() and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
