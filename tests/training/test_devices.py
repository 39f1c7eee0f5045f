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
    params = deepspeed_config(OptimConfig(lr=0.1))["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True  # no JIT build that would die on CUDA_HOME
    monkeypatch.setattr(devices, "fused_adam_available", lambda: True)
    params = deepspeed_config(OptimConfig(lr=0.1))["optimizer"]["params"]
    assert "torch_adam" not in params and params["lr"] == 0.1  # DeepSpeed's FusedAdam
    monkeypatch.setattr(devices, "has_cuda", lambda: False)
    assert deepspeed_config(OptimConfig())["optimizer"]["params"]["torch_adam"] is True


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


def test_a_phase_timer_waits_for_the_gpu_work_queued_before_and_in_it(monkeypatch):
    """GPU kernels run after the Python that queued them returns: without a synchronisation at both ends a phase's
    seconds would land in the next phase. On the CPU the order of events is what can be checked; the GPU
    figures are checked in ``tests/test_cuda.py``."""
    from rlhf_pipeline.rl import experience

    events = []
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("synchronize"))
    timings = {}
    with experience.timer("generate", timings):
        events.append("queue work")
    assert events == ["synchronize", "queue work", "synchronize"] and timings["timing/generate"] >= 0


def test_install_stops_when_a_gpu_driver_works_but_torch_cannot_use_it(tmp_path):
    """``make check-torch`` (run by the install): with a working ``nvidia-smi`` on the PATH and a CPU build of
    torch it must fail and say why; without one it passes."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)

    def check(path: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", "check-torch"], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "PATH": path})

    plain_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                 if not (Path(p) / "nvidia-smi").exists())
    assert check(plain_path).returncode == 0
    with_gpu = check(f"{tmp_path}{os.pathsep}{plain_path}")
    if torch.cuda.is_available():  # on a GPU machine with a CUDA build the check passes
        assert with_gpu.returncode == 0
    else:
        assert with_gpu.returncode != 0 and "nvidia-smi sees a GPU but torch" in with_gpu.stderr
