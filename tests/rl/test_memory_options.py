"""Memory options for real sizes, each checked against the plain path on CPU: LoRA (the reference is the policy
with its adapters off), gradient checkpointing, frozen models partitioned or offloaded by ZeRO-3, and the
ZeRO-3 policy's once-per-rollout gather for generation."""

import pytest
import torch

from rlhf_pipeline.adapters import LoraSettings, add_lora, enable_gradient_checkpointing
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.modeling import TinyModelConfig, ValueHeadModel, build_tiny_model, train_tokenizer
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.experience import make_experience
from rlhf_pipeline.rl.trainer import PPOTrainer
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.forward import ResponseForward, positions

PROMPTS = [f"\n\nHuman: Tell me about item {i}.\n\nAssistant:" for i in range(16)]
ARCHS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PROMPTS * 5, vocab_size=300)


def tiny(tokenizer, arch: str, seed: int = 0):
    return build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, seed=seed))


def trainer_for(tokenizer, arch="gpt2", iterations=2, **overrides) -> PPOTrainer:
    optim = OptimConfig(lr=5e-3, warmup_ratio=0.0, zero_stage=2)
    cfg = PPOConfig(**{
        "iterations": iterations, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2,
        "sampling": SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0), "ptx_coef": 0.0,
        "policy_optim": optim, "critic_optim": optim, "checkpoint_every": 0, "sample_every": 0, **overrides})
    return PPOTrainer(tiny(tokenizer, arch), ValueHeadModel(tiny(tokenizer, arch, seed=1), seed=2),
                      DialogueEncoder(tokenizer), PROMPTS, cfg)


def batch(tokenizer):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    width = max(map(len, ids))
    sequences = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in ids])
    mask = (sequences != tokenizer.pad_token_id).long()
    return sequences, mask, positions(mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_reference_is_the_base_model_and_the_merged_policy_is_the_trained_one(tokenizer, arch, tmp_path):
    base_policy, base_rm = tiny(tokenizer, arch).eval(), ValueHeadModel(tiny(tokenizer, arch, seed=1), seed=2).eval()
    trainer = trainer_for(tokenizer, arch, lora=LoraSettings(r=4, alpha=8))
    assert not any(p.requires_grad for n, p in trainer.policy.module.named_parameters() if "lora_" not in n)
    for _ in range(2):  # steps, not train(): train() merges the adapters at the end
        trainer.step()
    sequences, mask, position_ids = batch(tokenizer)

    def logits(model):  # at the positions that predict the last 3 tokens
        return ResponseForward(sequences, mask, position_ids, mask[:, -3:], packed=False).token_logits(model)

    with torch.no_grad():
        trained = logits(trainer.policy.module)
        assert not torch.allclose(trained, logits(base_policy), atol=1e-4)  # the adapters trained
        torch.testing.assert_close(logits(trainer.reference), logits(base_policy))  # adapters off = SFT model
        # the critic trains its own adapters and head on the reward model's weights; the RM scores without them
        torch.testing.assert_close(trainer.reward_model(sequences, mask, position_ids=position_ids)[0],
                                   base_rm(sequences, mask, position_ids=position_ids)[0])
        assert not torch.allclose(trainer.critic.module(sequences, mask, position_ids=position_ids)[0],
                                  base_rm(sequences, mask, position_ids=position_ids)[0], atol=1e-4)
    merged = trainer.trained_policy()
    assert type(merged) is type(base_policy)  # an ordinary transformers model, no peft wrapper
    merged.save_pretrained(tmp_path)
    reloaded = type(base_policy).from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(base_policy.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded), trained, atol=1e-5, rtol=1e-4)


def test_lora_refuses_zero3_and_unknown_placements():
    with pytest.raises(ValueError, match="ZeRO stage 0-2"):
        PPOConfig(lora=LoraSettings(r=8), policy_optim=OptimConfig(zero_stage=3))
    with pytest.raises(ValueError, match="frozen_models: unknown 'gpu'"):
        PPOConfig(frozen_models="gpu")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("adapted", [False, True], ids=["full", "lora"])
def test_checkpointed_gradients_equal_plain_gradients(tokenizer, arch, adapted):
    sequences, mask, position_ids = batch(tokenizer)
    grads = []
    for checkpointed in (False, True):
        lm = tiny(tokenizer, arch)
        model = ValueHeadModel(add_lora(lm, LoraSettings(r=4)) if adapted else lm, seed=3)
        # LoRA's B starts at zero, so A would get no gradient: give B values to check every path
        torch.manual_seed(4)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter)
        if checkpointed:
            enable_gradient_checkpointing(model)
        model.train()
        values, logits = model(sequences, mask, return_lm_logits=True, position_ids=position_ids)
        (values.square().mean() + logits.float().logsumexp(-1).mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert transformer_checkpointing_is_on(model)
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def transformer_checkpointing_is_on(model) -> bool:
    from rlhf_pipeline.adapters import transformer_of

    transformer = transformer_of(model)
    return getattr(transformer, "is_activation_checkpointing", None) or transformer.is_gradient_checkpointing


@pytest.mark.parametrize("placement", ["zero3", "zero3_offload"])
def test_frozen_models_under_zero3_score_as_whole_models(tokenizer, placement):
    def experience(trainer):
        torch.manual_seed(0)
        return make_experience(trainer.policy.module, trainer.reference, trainer.critic.module, trainer.reward_model,
                               tokenizer, trainer.prompt_ids[:6], trainer.cfg.sampling, {})

    whole = experience(trainer_for(tokenizer))
    sharded = trainer_for(tokenizer, frozen_models=placement)
    assert sharded.reference.module.transformer.wte.weight.numel() == 0  # partitioned, not a whole copy
    parted = experience(sharded)
    assert torch.equal(parted.sequences, whole.sequences)
    for name in ("old_logprobs", "ref_logprobs", "old_values", "raw_scores"):
        torch.testing.assert_close(getattr(parted, name), getattr(whole, name), msg=name)


def test_zero3_policy_generates_from_one_gather_per_rollout_the_same_samples(tokenizer):
    zero3 = OptimConfig(lr=5e-3, warmup_ratio=0.0, zero_stage=3,
                        extra_ds_config={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    plain, sharded = trainer_for(tokenizer), trainer_for(tokenizer, policy_optim=zero3)
    assert sharded.policy.module.transformer.wte.weight.numel() == 0
    generator = sharded.rollout_policy()
    assert generator is sharded.generation_copy.model and generator.transformer.wte.weight.numel() > 0
    for name, tensor in plain.policy.module.state_dict().items():
        torch.testing.assert_close(generator.state_dict()[name], tensor, msg=name)
    rollouts = []
    for trainer in (plain, sharded):
        torch.manual_seed(0)
        metrics, exp = trainer.step()
        rollouts.append(exp.sequences)
    assert torch.equal(rollouts[1], rollouts[0])
    assert sharded.generation_copy.model is generator  # refreshed in place, not rebuilt
    assert metrics["timing/gather"] > 0


def test_frozen_models_on_the_device_take_the_policys_precision(tokenizer):
    from rlhf_pipeline.training.engine import make_frozen_engine

    frozen = make_frozen_engine(tiny(tokenizer, "llama"), "device", bf16=True)
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}  # a bf16 policy's KL starts at 0, not noise
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert {p.dtype for p in make_frozen_engine(tiny(tokenizer, "llama"), "device", bf16=False).parameters()} == \
        {torch.float32}


@pytest.mark.parametrize("critic_from_reward_model", [True, False])
def test_launched_ranks_load_zero3_models_partitioned_and_train_as_from_whole_copies(tokenizer, tmp_path,
                                                                                     critic_from_reward_model):
    """``load_models`` (each launched rank): ZeRO-3 models are read straight into partitions, never whole in
    host memory, and the reference and critic are read from the job folder instead of copied from a policy the
    rank holds only a part of. Training from them equals training from whole models and their copies."""
    from rlhf_pipeline.modeling import ModelBundle
    from rlhf_pipeline.rl.models import load_models
    from tests.rl.test_trainer import zero3

    ModelBundle(tiny(tokenizer, "gpt2"), tokenizer).save_pretrained(str(tmp_path / "policy"))
    ModelBundle(ValueHeadModel(tiny(tokenizer, "gpt2", seed=1), seed=2), tokenizer).save_pretrained(
        str(tmp_path / "reward_model"))
    from_copies = trainer_for(tokenizer, policy_optim=zero3(5e-3), critic_optim=zero3(5e-3), frozen_models="zero3",
                              critic_from_reward_model=critic_from_reward_model)
    expected = from_copies.train().policy.state_dict()  # before the next trainer re-seeds the sampling RNG
    policy, models = load_models(tmp_path, from_copies.cfg)
    assert set(models) == {"reward_model", "reference", "critic"}
    for name, model in {"policy": policy.model, **models}.items():
        lm = model.lm if isinstance(model, ValueHeadModel) else model
        # zero.Init leaves empty placeholders where whole weights would be; the rank's part is in ds_tensor
        assert all(p.numel() == 0 and p.ds_tensor.numel() == p.ds_numel for p in lm.parameters()), name
    from_loaded = PPOTrainer(policy.model, encoder=DialogueEncoder(tokenizer), prompts=PROMPTS, cfg=from_copies.cfg,
                             **models)
    trained = from_loaded.train().policy.state_dict()
    assert not torch.equal(expected["transformer.wte.weight"], tiny(tokenizer, "gpt2").transformer.wte.weight)
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, msg=name)


def test_launched_ranks_with_lora_derive_the_reference_and_critic_as_in_one_process(tokenizer, tmp_path):
    """With LoRA the reference is the policy with adapters off and the critic shares the RM's weights: the ranks
    read only the policy and the RM, and train as one process does."""
    from rlhf_pipeline.modeling import ModelBundle
    from rlhf_pipeline.rl.models import load_models

    ModelBundle(tiny(tokenizer, "gpt2"), tokenizer).save_pretrained(str(tmp_path / "policy"))
    ModelBundle(ValueHeadModel(tiny(tokenizer, "gpt2", seed=1), seed=2), tokenizer).save_pretrained(
        str(tmp_path / "reward_model"))
    from_models = trainer_for(tokenizer, lora=LoraSettings(r=4, alpha=8))
    expected = from_models.train().policy.state_dict()
    policy, models = load_models(tmp_path, from_models.cfg)
    assert set(models) == {"reward_model"}
    trained = PPOTrainer(policy.model, encoder=DialogueEncoder(tokenizer), prompts=PROMPTS, cfg=from_models.cfg,
                         **models).train().policy.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, msg=name)


def test_launched_ranks_read_whole_models_in_the_runs_precision(tokenizer, tmp_path):
    """A bf16 run's ranks read bf16 weights (half of fp32's host memory; the engines would cast them anyway)."""
    from rlhf_pipeline.modeling import ModelBundle
    from rlhf_pipeline.rl.models import load_models

    ModelBundle(tiny(tokenizer, "llama"), tokenizer).save_pretrained(str(tmp_path / "policy"))
    ModelBundle(ValueHeadModel(tiny(tokenizer, "llama", seed=1)), tokenizer).save_pretrained(str(tmp_path / "reward_model"))
    bf16 = OptimConfig(zero_stage=2, bf16="true")
    for critic_from_reward_model in (True, False):
        cfg = PPOConfig(policy_optim=bf16, critic_optim=bf16, critic_from_reward_model=critic_from_reward_model)
        policy, models = load_models(tmp_path, cfg)
        for name, model in {"policy": policy.model, **models}.items():
            lm = model.lm if isinstance(model, ValueHeadModel) else model
            assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}, name
    fp32 = PPOConfig(policy_optim=OptimConfig(bf16="false"), critic_optim=OptimConfig(bf16="false"))
    assert {p.dtype for p in load_models(tmp_path, fp32)[0].model.parameters()} == {torch.float32}


def test_lora_takes_no_prebuilt_reference_or_critic(tokenizer):
    with pytest.raises(ValueError, match="cannot be passed in"):
        PPOTrainer(tiny(tokenizer, "gpt2"), ValueHeadModel(tiny(tokenizer, "gpt2")), DialogueEncoder(tokenizer), PROMPTS,
                   PPOConfig(lora=LoraSettings(r=4), rollout_batch_size=8), reference=tiny(tokenizer, "gpt2"))


@pytest.mark.parametrize("lora", [LoraSettings(), LoraSettings(r=4, alpha=8)])
def test_a_run_leaves_the_callers_models_as_they_were(tokenizer, lora):
    """The ablation scores the next seed with the same reward model: a run must not write adapters into it, switch
    off its dropout, swap its activations or cast it."""
    from torch import nn

    from rlhf_pipeline.launch import LaunchConfig, run_ppo
    from rlhf_pipeline.modeling import ModelBundle

    policy = ModelBundle(tiny(tokenizer, "gpt2"), tokenizer)
    reward_model = ModelBundle(ValueHeadModel(tiny(tokenizer, "gpt2", seed=1), seed=2), tokenizer)

    def snapshot(model):
        return ({k: v.clone() for k, v in model.state_dict().items()},
                [(name, type(module).__name__, getattr(module, "p", None)) for name, module in model.named_modules()])

    before = [snapshot(bundle.model) for bundle in (policy, reward_model)]
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in reward_model.model.modules())  # it has dropout
    cfg = PPOConfig(iterations=1, rollout_batch_size=8, mini_batch_size=8, lora=lora, critic_from_reward_model=True,
                    sampling=SamplingConfig(max_new_tokens=6, temperature=1.0), checkpoint_every=0,
                    policy_optim=OptimConfig(lr=1e-2, warmup_ratio=0.0), critic_optim=OptimConfig(lr=1e-2))
    result = run_ppo(policy, reward_model, PROMPTS, ([], []), cfg, LaunchConfig())
    trained = result.policy.state_dict()
    assert any(not torch.equal(trained[name], tensor) for name, tensor in before[0][0].items())  # it trained
    for bundle, (weights, modules) in zip((policy, reward_model), before, strict=True):
        after_weights, after_modules = snapshot(bundle.model)
        assert after_modules == modules  # no adapters, dropout and activations as they were
        assert after_weights.keys() == weights.keys()
        for name, tensor in weights.items():
            assert torch.equal(after_weights[name], tensor), name
