"""PPO through the `deepspeed` launcher with two gloo ranks on the CPU, against the in-process path."""

import json

import pytest
import torch

from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.modeling import (
    ModelBundle,
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    train_tokenizer,
)
from rlhf_pipeline.rl.launch import LaunchConfig, run_ppo
from rlhf_pipeline.rl.trainer import PPOConfig
from rlhf_pipeline.training.engine import OptimConfig
from tests.rl.test_trainer import zero3

pytestmark = pytest.mark.slow
PROMPTS = [f"\n\nHuman: What is {i} plus 1?\n\nAssistant:" for i in range(16)]


def test_two_ranks_through_the_launcher(tmp_path):
    """ZeRO-3 (every parameter partitioned) for the policy, ZeRO-2 for the critic."""
    tokenizer = train_tokenizer(PROMPTS * 3, vocab_size=300)
    shape = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)
    policy = ModelBundle(build_tiny_model(tokenizer, shape), tokenizer)
    # half the vocabulary ends a response, so the ranks' batches stop at different steps: generating from the
    # partitioned ZeRO-3 engine would then leave one rank waiting for the other in a per-token all-gather
    policy.model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(2, len(tokenizer) // 2)]
    initial = {name: tensor.clone() for name, tensor in policy.model.state_dict().items()}
    reward_model = ModelBundle(ValueHeadModel(build_tiny_model(tokenizer, shape)), tokenizer)
    cfg = PPOConfig(iterations=2, rollout_batch_size=4, mini_batch_size=2, sampling=SamplingConfig(max_new_tokens=6),
                    policy_optim=zero3(1e-2), critic_optim=OptimConfig(lr=1e-4, zero_stage=2),
                    checkpoint_every=1, sample_every=1, ptx_coef=0.1, ptx_batch_size=2)
    launch = LaunchConfig(num_processes=2, master_port=29517, job_dir=str(tmp_path / "job"), timeout_s=300)
    result = run_ppo(policy, reward_model, PROMPTS, (PROMPTS, ["1"] * 16), cfg, launch,
                     checkpoint_dir=str(tmp_path / "checkpoints"))
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(h["response/length"] < 6 for h in result.history)  # responses did stop early
    assert json.loads((tmp_path / "job/output/status.json").read_text())["world_size"] == 2
    assert (tmp_path / "checkpoints/latest").read_text() == "iteration_2"
    assert result.samples
    # the written-back policy is whole (ZeRO-3 gathered it) and trained
    trained = result.policy.state_dict()
    assert {name: t.shape for name, t in trained.items()} == {name: t.shape for name, t in initial.items()}
    assert not torch.equal(trained["transformer.wte.weight"], initial["transformer.wte.weight"])
    # each rank rolled out its own 4 prompts, ZeRO sharded the optimiser state over both ranks
    for model in ("policy", "critic"):
        assert len(list((tmp_path / f"checkpoints/{model}/iteration_2").glob("*optim_states.pt"))) == 2


def test_a_job_past_its_time_limit_is_stopped_with_every_process_it_started(tmp_path):
    import subprocess
    import sys

    from rlhf_pipeline.rl.launch import run_job

    marker = tmp_path / "child.pid"
    # a "launcher" that starts a long-lived child, as deepspeed's runner starts its ranks
    script = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              f" open({str(marker)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    with pytest.raises(TimeoutError, match="launcher.timeout_s = 2"):
        run_job([sys.executable, "-c", script], timeout_s=2)
    child = int(marker.read_text())
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
    assert state in ("", "Z"), f"the launcher's child {child} survived the timeout (state {state!r})"
