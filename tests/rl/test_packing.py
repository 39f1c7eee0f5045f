"""Padding-free passes give the padded passes' numbers: log-probs, values, RM scores, losses and gradients, for
GPT-2 and Llama, with mixed prompt and response lengths, a row that stops at its first token and rows that
hit the cap."""

import pytest
import torch

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig, left_pad
from rlhf_pipeline.modeling import TinyModelConfig, ValueHeadModel, build_tiny_model, train_tokenizer
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.experience import compute_advantages, score_rollouts
from rlhf_pipeline.rl.trainer import PPOTrainer
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.forward import ResponseForward, positions

PROMPTS = [f"\n\nHuman: {'Tell me more about ' * (i % 4)}item {i}.\n\nAssistant:" for i in range(16)]
CAP = 6


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PROMPTS * 5, vocab_size=300)


def test_packed_rows_put_each_response_token_where_its_row_predicts_it():
    a, b, c, eos, d, e, f, g, h, pad = 10, 11, 12, 0, 13, 14, 15, 16, 17, 1
    # prompt width 3, responses 3: real lengths 4, 6 and 2
    sequences = torch.tensor([[pad, a, b, c, eos, pad], [d, e, f, g, h, eos], [pad, pad, a, b, pad, pad]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    attention_mask = torch.cat([(sequences[:, :3] != pad).long(), response_mask], dim=1)
    forward = ResponseForward(sequences, attention_mask, positions(attention_mask), response_mask, packed=True)
    # bins as wide as the longest row (6): [d e f g h EOS] and [a b c EOS | a b], first-fit from the longest
    assert forward.inputs["input_ids"].tolist() == [[d, e, f, g, h, eos], [a, b, c, eos, a, b]]
    assert forward.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]]
    assert forward.inputs["attention_mask"] is None and forward.computed_tokens == 12  # padded: 18
    # flat indices: row 0 predicts c at 7, EOS at 8; row 1 g, h, EOS at 2, 3, 4; row 2 b at 10
    assert forward.predictors.tolist() == [7, 8, 2, 3, 4, 10]
    assert forward.last.tolist() == [9, 5, 11] and forward.tokens.tolist() == [c, eos, g, h, eos, b]
    assert forward.scatter(torch.arange(1.0, 7.0)).tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 0]]
    padded = ResponseForward(sequences, attention_mask, positions(attention_mask), response_mask, packed=False)
    assert padded.computed_tokens == 18 and padded.tokens.tolist() == forward.tokens.tolist()


def rollouts(tokenizer, eos: int, pad: int):
    """Six rollouts of different prompt lengths: EOS first, mid-way, or none (the cap)."""
    prompt, prompt_mask = left_pad([tokenizer(p)["input_ids"] for p in PROMPTS[:6]], pad)
    bodies = [[eos], [7, 8, eos], [9] * CAP, [10, 11, 12, 13, eos], [14] * CAP, [15, eos]]
    response = torch.full((6, CAP), pad)
    for row, body in enumerate(bodies):
        response[row, :len(body)] = torch.tensor(body)
    response_mask = (torch.arange(CAP) < torch.tensor([len(b) for b in bodies]).unsqueeze(1)).long()
    return prompt, prompt_mask, response, response_mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("forward_batch_size", [None, 2])
def test_scores_of_packed_chunks_equal_the_padded_pass(tokenizer, arch, forward_batch_size):
    def model(seed):
        return build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2,
                                                           seed=seed)).eval()

    policy, reference = model(0), model(1)
    critic, reward_model = ValueHeadModel(model(2), seed=3).eval(), ValueHeadModel(model(4), seed=5).eval()
    batch = rollouts(tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    padded = score_rollouts(policy, reference, critic, reward_model, *batch, eos, [eos], packing=False)
    packed = score_rollouts(policy, reference, critic, reward_model, *batch, eos, [eos],
                            forward_batch_size=forward_batch_size, packing=True)
    for name in ("old_logprobs", "ref_logprobs", "old_values", "raw_scores"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), msg=name)
    assert (padded.old_logprobs[padded.response_mask.bool()] < 0).all()  # real numbers were compared, not zeros
    assert (padded.old_logprobs[~padded.response_mask.bool()] == 0).all()
    assert padded.truncated.tolist() == [False, False, True, False, True, False]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_update_has_the_padded_losses_and_gradients(tokenizer, arch):
    def trainer(**overrides):
        shape = TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2)
        optim = OptimConfig(lr=1e-3, warmup_ratio=0.0, zero_stage=2)
        cfg = PPOConfig(rollout_batch_size=6, mini_batch_size=6, ppo_epochs=1, kl_coef=0.1, ptx_coef=0.0,
                        sampling=SamplingConfig(max_new_tokens=CAP), policy_optim=optim, critic_optim=optim,
                        checkpoint_every=0, **overrides)
        return PPOTrainer(build_tiny_model(tokenizer, shape), ValueHeadModel(build_tiny_model(tokenizer, shape), seed=1),
                          DialogueEncoder(tokenizer), PROMPTS, cfg)

    padded, packed = trainer(packing=False), trainer(packing=True, micro_batch_tokens=70)
    batch = rollouts(tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)
    exp = score_rollouts(padded.policy.module, padded.reference, padded.critic.module, padded.reward_model, *batch,
                         tokenizer.eos_token_id, [tokenizer.eos_token_id])
    exp = compute_advantages(exp, padded.cfg, padded.moments)
    torch.manual_seed(0)
    padded_metrics = padded.update(exp)
    torch.manual_seed(0)
    packed_metrics = packed.update(exp)
    assert packed_metrics["update/real_token_share"] > padded_metrics["update/real_token_share"]
    for key in ("loss/policy", "loss/value", "policy/grad_norm", "value/grad_norm", "policy/entropy"):
        assert packed_metrics[key] == pytest.approx(padded_metrics[key], rel=1e-4, abs=1e-6), key
    # Adam's first step is lr * g / (|g| + eps): a weight whose gradient is near eps moves by a fraction of lr that
    # float rounding can shift, so weights agree to 5 % of one step (lr 1e-3), and every step moved them
    fresh = build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2))
    for a, b, c in zip(padded.policy.module.parameters(), packed.policy.module.parameters(), fresh.parameters(),
                       strict=True):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)
        assert (a - c).abs().max() > 5e-4
