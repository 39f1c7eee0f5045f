"""The maths of PPO-max (Zheng et al., 2023, "Secrets of RLHF Part I"), one function per formula.

Shapes: B rollouts, R response tokens. ``response_mask`` (B, R) is 1 on response tokens up to and
including EOS and 0 on padding after it; every reduction over tokens goes through ``masked_mean``.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1; an empty mask gives 0 (not nan)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the valid tokens of the whole batch; masked tokens come out 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + EPS) * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from sampled tokens: ``k1`` = log π − log π_ref, ``k3`` = (ρ−1) − log ρ, ρ = π_ref/π."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator: unknown {estimator!r}; valid: k1, k3")


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward r_t = −η·KL_t, plus the sequence score at the last response token (B, R)."""
    rewards = -kl_coef * kl * response_mask
    last = (response_mask.sum(dim=1) - 1).clamp(min=0).long()  # index of EOS (or the last token)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    δ_t = r_t + γ V(s_{t+1}) − V(s_t) with V = 0 after the last token; A_t = Σ_l (γλ)^l δ_{t+l};
    returns R_t = A_t + V(s_t). Returns ``(advantages, returns)``, 0 on masked tokens.
    """
    values = values * response_mask
    rewards = rewards * response_mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * response_mask[:, t]  # padding after EOS contributes nothing
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * response_mask


class RunningMoments:
    """Running mean and std of a scalar stream (parallel Welford), merged across ranks by the caller."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    @property
    def std(self) -> float:
        """Standard deviation of the stream so far, ``sqrt(m2 / count)``; 1.0 before two values."""
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def update(self, batch_count: float, batch_mean: float, batch_m2: float) -> None:
        """Merge a batch given by its count, mean and sum of squared deviations (Chan et al.)."""
        total = self.count + batch_count
        if batch_count == 0:
            return
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta**2 * self.count * batch_count / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        """``count``, ``mean`` and ``m2`` (the sum of squared deviations), for a checkpoint's JSON."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the moments from a ``state_dict`` (a missing key raises ``KeyError``)."""
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def normalise_and_clip_scores(scores: torch.Tensor, mean: float, std: float, clip: float | None) -> torch.Tensor:
    """Score reparameterisation r̃ = clip((r − μ)/σ, −δ, δ) (δ = ``clip``, none if ``None``)."""
    normalised = (scores - mean) / (std + EPS)
    return normalised.clamp(-clip, clip) if clip is not None else normalised


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate L = mean max(−A ρ, −A clip(ρ, 1−ε, 1+ε)), ρ = π/π_old, with its diagnostics."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), response_mask)
    metrics = {
        "policy/clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), response_mask),
        "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask),
        "policy/ratio": masked_mean(ratio, response_mask),
    }
    return loss, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
    clip_eps: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_v = 0.5 mean max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε_v); no clip if ``None``."""
    v_loss_unclipped = (values - returns) ** 2
    if clip_eps is None:
        v_loss = v_loss_unclipped
        clipfrac = torch.zeros((), device=values.device)
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        v_loss_clipped = (values_clipped - returns) ** 2
        v_loss = torch.max(v_loss_unclipped, v_loss_clipped)
        clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).float(), response_mask)
    loss = 0.5 * masked_mean(v_loss, response_mask)
    return loss, {"value/clipfrac": clipfrac, "value/mean": masked_mean(values, response_mask)}


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position (B, R), from its log-softmax (B, R, V)."""
    return -(log_probs.exp() * log_probs).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V)/Var(R) over valid tokens: how much of the returns the critic predicts."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1.0 - var_residual / (var_returns + EPS)
