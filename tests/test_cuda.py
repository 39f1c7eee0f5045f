"""The GPU path on a real GPU: devices, precision, memory release, static-cache generation and a whole
`kedro run --env test`. Skipped where torch sees no CUDA device (the CPU logic has its own tests)."""

import gc
import json
from dataclasses import replace

import pytest
import torch

from rlhf_pipeline.adapters import LoraSettings
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig, sample_responses
from rlhf_pipeline.modeling import TinyModelConfig, ValueHeadModel, build_tiny_model, train_tokenizer
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.trainer import PPOTrainer
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.sft import SFTConfig, train_sft

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PROMPTS = [f"\n\nHuman: Tell me about item {i}.\n\nAssistant:" for i in range(16)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PROMPTS * 5, vocab_size=300)


@pytest.mark.parametrize("lora", [0, 4])
def test_ppo_puts_every_model_and_batch_on_the_gpu_in_bf16(tokenizer, lora):
    shape = TinyModelConfig(arch="llama", hidden_size=64, num_layers=2, num_heads=2)
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.0, zero_stage=2, gradient_checkpointing=True)
    cfg = PPOConfig(iterations=2, rollout_batch_size=16, mini_batch_size=8, ptx_coef=0.0, checkpoint_every=0,
                    sampling=SamplingConfig(max_new_tokens=8), policy_optim=optim, critic_optim=optim,
                    lora=LoraSettings(r=lora))
    trainer = PPOTrainer(build_tiny_model(tokenizer, shape), ValueHeadModel(build_tiny_model(tokenizer, shape)),
                         DialogueEncoder(tokenizer), PROMPTS, cfg)
    models = [trainer.policy.module, trainer.critic.module]
    if not lora:
        models += [trainer.reference, trainer.reward_model]
    for model in models:
        assert {p.device.type for p in model.parameters()} == {"cuda"}
        assert torch.bfloat16 in {p.dtype for p in model.parameters()}
    metrics, exp = trainer.step()
    assert exp.sequences.device.type == "cuda" and exp.old_logprobs.dtype == torch.float32  # losses in fp32
    assert abs(metrics["kl/sequence"]) < 1e-3  # the reference is the policy, in the same precision
    assert metrics["timing/generate_tokens_per_s"] > 0


def test_sft_leaves_only_its_model_on_the_gpu(tokenizer):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=256, num_layers=4, num_heads=4))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model, _ = train_sft(model, DialogueEncoder(tokenizer), PROMPTS, ["Sure."] * 16, PROMPTS[:2], ["Sure."] * 2,
                         SFTConfig(epochs=1, max_length=64, eval_every=0, optim=OptimConfig(zero_stage=2)))
    gc.collect()
    # the optimizer's fp32 master weights and Adam moments (3x more) are gone; only the model remains
    assert torch.cuda.memory_allocated() - before < 1.5 * weights


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_cache_compiled_generation_samples_what_plain_generation_does(tokenizer, arch):
    model = build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=2)).cuda()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:6]]
    greedy = SamplingConfig(max_new_tokens=12, do_sample=False)
    plain = sample_responses(model, tokenizer, prompts, greedy)[2]
    static = sample_responses(model, tokenizer, prompts, replace(greedy, cache_implementation="static"))[2]
    assert torch.equal(static, plain[:, :static.shape[1]])


@pytest.mark.slow
def test_kedro_run_test_environment_on_the_gpu(tmp_path):
    from tests.conftest import kedro, make_project_copy

    project = make_project_copy(tmp_path / "project")
    kedro(project, "run", "--env", "test")
    reporting = project / "data" / "08_reporting"
    for stage in ("sft", "reward_model", "judge"):  # the trained weights sat on the GPU
        assert json.loads((reporting / f"{stage}_metrics.json").read_text())["device"] == "cuda", stage
    assert set(json.loads((reporting / "evaluation_summary.json").read_text())) == {"sft", "ppo_max", "vanilla"}


def test_score_moments_all_reduce_on_an_nccl_group(monkeypatch):
    """NCCL refuses CPU tensors: the moments' all-reduce must run on the scores' GPU."""
    from rlhf_pipeline.rl import experience as experience_module
    from rlhf_pipeline.rl import ppo_max as F
    from rlhf_pipeline.training import engine

    engine.init_distributed()
    assert torch.distributed.get_backend() == "nccl"
    monkeypatch.setattr(engine, "world", lambda: (0, 2))  # take the all-reduce path on the one-rank group
    moments = F.RunningMoments()
    experience_module.merge_moments(moments, torch.tensor([1.0, 2.0, 4.0], device="cuda"))
    assert moments.count == 3 and moments.mean == pytest.approx(7 / 3)


def test_phase_timings_hold_the_gpu_work_queued_in_them():
    from rlhf_pipeline.rl.experience import timer

    torch.cuda.synchronize()
    timings = {}
    with timer("busy", timings):
        torch.cuda._sleep(200_000_000)  # queued at once, runs for ~0.1 s at ~2 GHz
    with timer("idle", timings):
        pass
    assert timings["timing/busy"] > 0.02 and timings["timing/idle"] < 0.01


def test_cuda_rng_state_round_trips():
    from rlhf_pipeline.training import devices

    state = devices.rng_state()
    assert "cuda_rng" in state
    first = torch.rand(3, device="cuda")
    devices.set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), first)


def test_launched_ranks_put_whole_models_on_their_gpu_in_bf16_as_they_read_them(tokenizer, tmp_path):
    from rlhf_pipeline.modeling import ModelBundle
    from rlhf_pipeline.rl.models import load_models

    shape = TinyModelConfig(arch="llama", hidden_size=64, num_layers=2, num_heads=2)
    ModelBundle(build_tiny_model(tokenizer, shape), tokenizer).save_pretrained(str(tmp_path / "policy"))
    ModelBundle(ValueHeadModel(build_tiny_model(tokenizer, shape)), tokenizer).save_pretrained(str(tmp_path / "reward_model"))
    policy, models = load_models(tmp_path, PPOConfig())  # bf16 "auto": on where the GPU supports it
    for name, model in {"policy": policy.model, **models}.items():
        lm = model.lm if isinstance(model, ValueHeadModel) else model
        assert {p.device.type for p in lm.parameters()} == {"cuda"}, name
        assert {p.dtype for p in lm.parameters()} == {torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32}
