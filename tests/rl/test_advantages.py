"""compute_advantages: score reparameterisation, the KL-shaped rewards, GAE, whitening and advantage clipping in
the order the trainer applies them, on buffers small enough to work by hand."""

import torch

from rlhf_pipeline.rl import ppo_max as F
from rlhf_pipeline.rl.config import PPOConfig, engine_optims
from rlhf_pipeline.rl.experience import Experience, compute_advantages
from rlhf_pipeline.training.engine import OptimConfig, make_engine


def one_token_buffer(raw_scores: list[float]) -> Experience:
    """Rollouts of one response token each, with no KL to the reference and zero values: each advantage is the
    (reparameterised) score itself (γ = λ = 1)."""
    b = len(raw_scores)
    zeros = torch.zeros(b, 1)
    return Experience(sequences=torch.zeros(b, 2, dtype=torch.long), attention_mask=torch.ones(b, 2),
                      position_ids=torch.arange(2).repeat(b, 1), response_mask=torch.ones(b, 1),
                      old_logprobs=zeros, ref_logprobs=zeros, old_values=zeros,
                      raw_scores=torch.tensor(raw_scores), truncated=torch.zeros(b, dtype=torch.bool))


def advantages(raw_scores: list[float], **settings) -> Experience:
    cfg = PPOConfig(gamma=1.0, lam=1.0, advantage_normalisation=False, **settings)
    return compute_advantages(one_token_buffer(raw_scores), cfg, F.RunningMoments())


def test_reward_scaling_divides_by_the_running_std_without_centring():
    # scores 0 and 4: mean 2, population std sqrt(((0-2)^2 + (4-2)^2) / 2) = 2
    exp = advantages([0.0, 4.0], score_reparam="scale", score_clip=None)
    torch.testing.assert_close(exp.scores, torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.advantages, torch.tensor([[0.0], [2.0]]), atol=1e-6, rtol=0)
    normalised = advantages([0.0, 4.0], score_reparam="normalise", score_clip=0.5)  # (s - 2) / 2, clipped at ±0.5
    torch.testing.assert_close(normalised.scores, torch.tensor([-0.5, 0.5]), atol=1e-6, rtol=0)


def test_advantage_clipping_clamps_after_whitening():
    exp = advantages([0.0, 4.0, 1.0], score_reparam="none", score_clip=None, advantage_clip=0.5)
    torch.testing.assert_close(exp.advantages, torch.tensor([[0.0], [0.5], [0.5]]))
    # whitened first (masked_whiten), then clamped to ±1: only the largest advantage is cut
    cfg = PPOConfig(gamma=1.0, lam=1.0, advantage_normalisation=True, advantage_clip=1.0, score_reparam="none",
                    score_clip=None)
    whitened = compute_advantages(one_token_buffer([0.0, 4.0, 1.0]), cfg, F.RunningMoments()).advantages
    # mean 5/3, population std sqrt(((5/3)^2 + (7/3)^2 + (2/3)^2) / 3) = 1.699673: (-0.980581, 1.372813, -0.392232)
    torch.testing.assert_close(whitened, torch.tensor([[-0.980581], [1.0], [-0.392232]]), atol=1e-5, rtol=0)


def test_gradient_clipping_reaches_each_engine():
    cfg = PPOConfig(policy_optim=OptimConfig(lr=1e-5, grad_clip=0.5), critic_optim=OptimConfig(lr=1e-4, grad_clip=0.25))
    policy_optim, critic_optim = engine_optims(cfg)  # the settings make_engines builds the two engines with
    assert make_engine(torch.nn.Linear(2, 1), policy_optim, total_steps=1).gradient_clipping() == 0.5
    assert make_engine(torch.nn.Linear(2, 1), critic_optim, total_steps=1).gradient_clipping() == 0.25


def test_the_critic_starts_as_the_reward_model_or_as_the_policy_under_a_new_head():
    from rlhf_pipeline.modeling import TinyModelConfig, ValueHeadModel, build_tiny_model, train_tokenizer
    from rlhf_pipeline.rl.models import build_models

    tokenizer = train_tokenizer(["\n\nHuman: hi\n\nAssistant: hello"] * 20, vocab_size=120)
    def tiny(seed: int):
        return build_tiny_model(tokenizer, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, seed=seed))

    policy, reward_model = tiny(0), ValueHeadModel(tiny(1), seed=2)
    ids, mask = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)
    from_rm = build_models(policy, reward_model, PPOConfig(critic_from_reward_model=True)).critic
    rm_values = reward_model(ids, mask)[0]  # dropout is off in the run's models (build_models)
    torch.testing.assert_close(from_rm(ids, mask)[0], rm_values)  # the RM's weights and value head
    # a copy that shares no tensor with the RM: training the critic leaves the RM's scores unchanged
    assert {p.data_ptr() for p in from_rm.parameters()}.isdisjoint(p.data_ptr() for p in reward_model.parameters())
    from_sft = build_models(policy, reward_model, PPOConfig(critic_from_reward_model=False)).critic
    torch.testing.assert_close(from_sft.lm.transformer.wte.weight, policy.transformer.wte.weight)
    assert not torch.allclose(from_sft(ids, mask)[0], rm_values)
