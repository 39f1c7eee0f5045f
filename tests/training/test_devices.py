"""Devices and precision decided in one place (training/devices.py), and what the trainer does with them."""

import torch

from rlhf_pipeline.training import devices
from rlhf_pipeline.training.engine import OptimConfig, deepspeed_config


def test_each_rank_uses_its_local_gpu_and_the_cpu_without_one(monkeypatch):
    monkeypatch.setattr(devices, "has_cuda", lambda: False)
    assert devices.rank_device() == torch.device("cpu") and devices.backend() == "gloo"
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.rank_device() == torch.device("cuda", 3) and devices.backend() == "nccl"
    monkeypatch.delenv("LOCAL_RANK")
    assert devices.rank_device() == torch.device("cuda", 0)


def test_optimiser_is_fused_adam_only_where_it_can_be_built(monkeypatch):
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(devices, "fused_adam_available", lambda: False)  # pip torch, no CUDA toolkit
    params = deepspeed_config(OptimConfig(lr=0.1), 10)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True  # no JIT build that would die on CUDA_HOME
    monkeypatch.setattr(devices, "fused_adam_available", lambda: True)
    params = deepspeed_config(OptimConfig(lr=0.1), 10)["optimizer"]["params"]
    assert "torch_adam" not in params and params["lr"] == 0.1  # DeepSpeed's FusedAdam
    monkeypatch.setattr(devices, "has_cuda", lambda: False)
    assert deepspeed_config(OptimConfig(), 10)["optimizer"]["params"]["torch_adam"] is True


def test_fused_adam_needs_a_prebuilt_op_or_a_cuda_toolkit(monkeypatch):
    import deepspeed.git_version_info
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {"fused_adam": False})
    assert not devices.fused_adam_available()
    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {"fused_adam": True})
    assert devices.fused_adam_available()
    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    assert devices.fused_adam_available()


def test_rng_state_round_trips():
    state = devices.rng_state()
    first = torch.rand(3)
    devices.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
