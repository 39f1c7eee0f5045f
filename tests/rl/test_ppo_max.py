import math

import pytest
import torch

from rlhf_pipeline.rl import ppo_max as F


def test_gae_on_four_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.full((1, 4), 0.5)
    advantages, returns = F.gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=0.9)
    # δ = [0, 0, 0, 0.5]; A_t = 0.9^(3-t) * 0.5
    torch.testing.assert_close(advantages, torch.tensor([[0.3645, 0.405, 0.45, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.8645, 0.905, 0.95, 1.0]]))


def test_gae_matches_the_sum_formula_and_ignores_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]).float()
    gamma, lam = 0.99, 0.9
    advantages, _ = F.gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        v = torch.cat([values[b, :n], torch.zeros(1)])
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[b, t].item() == pytest.approx(expected.item(), abs=1e-5)
    changed = rewards.clone()
    changed[1, 4:] = 100.0  # tokens after EOS change nothing
    torch.testing.assert_close(F.gae(changed, values, mask, gamma, lam)[0], advantages)


def test_kl_penalty_on_every_token_and_score_on_the_last_valid_one():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards = F.kl_shaped_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0]]))


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert F.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert F.kl_estimate(logp, ref, "k3").item() == pytest.approx((0.5 - 1) - math.log(0.5))
    with pytest.raises(ValueError, match="valid: k1, k3"):
        F.kl_estimate(logp, ref, "k2")


def test_masked_whiten_uses_only_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    std = math.sqrt(2 / 3)
    torch.testing.assert_close(F.masked_whiten(x, mask), torch.tensor([[-1 / std, 0.0, 1 / std, 0.0]]), atol=1e-4, rtol=0)
    assert F.masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not nan


def test_policy_loss_at_and_beyond_the_clip_range():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.ones(1, 3)
    loss, metrics = F.policy_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2)
    # ρ=1.5 clipped to 1.2 -> -1.2; ρ=0.5 keeps the pessimistic -0.5; ρ=1.1 inside -> -1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1) / 3)
    assert metrics["policy/clipfrac"].item() == pytest.approx(1 / 3)
    loss_neg, _ = F.policy_loss(logp, old, -adv, torch.ones(1, 3), clip_eps=0.2)
    assert loss_neg.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3)  # ρ=0.5 with A<0 is clipped to 0.8


def test_value_loss_clipping_around_old_values():
    loss, _ = F.value_loss(torch.tensor([[1.0, 0.3]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]]),
                           torch.ones(1, 2), clip_eps=0.2)
    # token 0: max((1-0)^2, (0.7-0)^2) = 1; token 1: V inside the clip range, (0.3-1)^2 = 0.49
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.49) / 2)
    unclipped, _ = F.value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), None)
    assert unclipped.item() == pytest.approx(0.5)


def test_running_moments_match_the_whole_stream():
    moments = F.RunningMoments()
    for chunk in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])):
        moments.update(chunk.numel(), chunk.mean().item(), ((chunk - chunk.mean()) ** 2).sum().item())
    assert moments.mean == pytest.approx(3.0) and moments.std == pytest.approx(math.sqrt(2.0))
    normalised = F.normalise_and_clip_scores(torch.tensor([3.0, 10.0, -10.0]), moments.mean, moments.std, clip=0.8)
    torch.testing.assert_close(normalised, torch.tensor([0.0, 0.8, -0.8]))
