"""SFT, reward-model and PPO training through the `deepspeed` launcher with two gloo ranks on the CPU."""

import copy
import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.launch import LaunchConfig, run_ppo, run_reward_training, run_sft
from rlhf_pipeline.modeling import (
    ModelBundle,
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    disable_dropout,
    train_tokenizer,
)
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.reward import RewardConfig
from rlhf_pipeline.training.sft import SFTConfig
from tests.rl.test_trainer import zero3

pytestmark = pytest.mark.slow
PROMPTS = [f"\n\nHuman: What is {i} plus 1?\n\nAssistant:" for i in range(16)]


def test_two_ranks_through_the_launcher(tmp_path):
    """ZeRO-3 (every parameter partitioned) for the policy and the frozen models, ZeRO-2 for the critic."""
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
                    frozen_models="zero3", checkpoint_every=1, sample_every=1, ptx_coef=0.1, ptx_batch_size=2)
    launch = LaunchConfig(num_processes=2, master_port=29517, job_dir=str(tmp_path / "job"), timeout_s=300)
    logged = []
    result = run_ppo(policy, reward_model, PROMPTS, (PROMPTS, ["1"] * 16), cfg, launch,
                     checkpoint_dir=str(tmp_path / "checkpoints"), log=lambda metrics, step: logged.append((step, metrics)))
    assert [h["step"] for h in result.history] == [1, 2]
    # rank 0's live metrics reach the caller's LogFn under the names an in-process run logs
    assert [step for step, _ in logged] == [1, 2] and {"kl/sequence", "response/truncated_fraction"} <= set(logged[0][1])
    assert all(h["response/length"] < 6 for h in result.history)  # responses did stop early
    status = json.loads((tmp_path / "job/output/results.json").read_text())
    assert status["world_size"] == 2
    # each rank read its half of every ZeRO-3 model (plus padding to even halves), never the whole model
    loaded = status["parameters_at_load"]
    for model in ("policy", "reference", "reward_model"):
        held, total = loaded[model]
        assert total > 10_000 and total / 2 <= held <= total / 2 + 50, (model, held, total)
    assert loaded["critic"][0] == loaded["critic"][1]  # ZeRO-2 keeps whole weights on every rank
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

    from rlhf_pipeline.launch.job import run_job

    marker = tmp_path / "child.pid"
    # a "launcher" that starts a long-lived child, as deepspeed's runner starts its ranks
    script = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              f" open({str(marker)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    with pytest.raises(TimeoutError, match="launcher.timeout_s = 2"):
        run_job([sys.executable, "-c", script], timeout_s=2)
    child = int(marker.read_text())
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
    assert state in ("", "Z"), f"the launcher's child {child} survived the timeout (state {state!r})"


def no_dropout_model(tokenizer):
    """A tiny model without dropout (in its saved config too), so that ranks and processes compute the same."""
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2))
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    return disable_dropout(model)


def test_sft_and_reward_model_train_data_parallel_on_two_ranks_as_in_one_process(tmp_path):
    """Every demonstration (pair) is the same, so each rank's half of a batch gives the whole batch's gradient:
    two ranks x 4 must update the weights exactly as one process x 8 does."""
    tokenizer = train_tokenizer(PROMPTS * 3 + ["It is 5."] * 3, vocab_size=300)
    prompts, responses = [PROMPTS[4]] * 16, ["It is 5."] * 16
    start = ModelBundle(no_dropout_model(tokenizer), tokenizer)
    sft = SFTConfig(epochs=2, max_length=48, eval_every=0,
                    optim=OptimConfig(lr=1e-2, zero_stage=2, micro_batch_size=8, warmup_ratio=0.0))
    alone, alone_metrics = run_sft(start.with_model(copy.deepcopy(start.model)), (prompts, responses),
                                   (prompts[:2], responses[:2]), sft, LaunchConfig())
    launch = LaunchConfig(num_processes=2, master_port=29518, job_dir=str(tmp_path / "sft_job"), timeout_s=300)
    per_rank = replace(sft, optim=replace(sft.optim, micro_batch_size=4))
    together, metrics = run_sft(start, (prompts, responses), (prompts[:2], responses[:2]), per_rank, launch)
    assert metrics["world_size"] == 2 and metrics["val/loss"] < 0.9 * metrics["val/loss_before"]
    assert metrics["val/loss"] == pytest.approx(alone_metrics["val/loss"], rel=1e-4)
    # Adam turns last-digit differences of near-zero gradients into up to ~1 % of a step (lr 1e-2); a rank
    # training on the wrong half or scale of the data would be off by whole steps
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(together.state_dict()[name], tensor, atol=2e-4, rtol=1e-4, msg=name)

    value_model = ModelBundle(ValueHeadModel(no_dropout_model(tokenizer)), tokenizer)
    pairs = pd.DataFrame({"prompt": prompts, "chosen": responses, "rejected": ["It is 7."] * 16})
    # eps = 1: Adam's update g / (|g| + 1) follows the gradient; with the default eps, gradients that vanish in
    # theory (the attention's key biases, the value head's bias under a ranking loss) are float noise that
    # Adam's g / |g| blows up to a whole step
    rm = RewardConfig(epochs=2, max_length=48, optim=OptimConfig(lr=1.0, zero_stage=2, micro_batch_size=8,
                                                                  extra_ds_config={"optimizer": {"params": {"eps": 1.0}}}))
    start_head = value_model.model.value_head.weight.detach().clone()
    alone, _ = run_reward_training(value_model.with_model(copy.deepcopy(value_model.model)), pairs, rm, LaunchConfig())
    launch = replace(launch, job_dir=str(tmp_path / "rm_job"))
    together, counts = run_reward_training(value_model, pairs, replace(rm, optim=replace(rm.optim, micro_batch_size=4)),
                                           launch)
    assert counts["world_size"] == 2 and counts["pairs_dropped"] == 0
    assert (alone.value_head.weight - start_head).abs().max() > 1e-3  # it trained
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(together.state_dict()[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_every_rank_gets_as_many_micro_batches(monkeypatch):
    """5 items over 2 ranks: without wrapping, rank 0 would take 2 micro-batches of 2 and rank 1 one, then wait
    forever in the second step's all-reduce."""
    from rlhf_pipeline.training import loop

    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(loop, "world", lambda rank=rank: (rank, 2))
        shards.append([indices for _, indices in loop.micro_batches(5, 2, 1, seed=0)])
    assert [len(s) for s in shards] == [2, 2] and [len(b) for s in shards for b in s] == [2, 1, 2, 1]
    assert set().union(*(set(b) for s in shards for b in s)) == set(range(5))
    monkeypatch.setattr(loop, "world", lambda: (0, 2))
    assert loop.optimizer_steps(5, 1, OptimConfig(micro_batch_size=2)) == 2
