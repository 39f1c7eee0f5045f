"""Monitors of a PPO run (the paper's §5.2): rollout metrics and collapse alarms, decided alike on every rank."""

from __future__ import annotations

import math

import torch

from rlhf_pipeline.generation import decode_responses
from rlhf_pipeline.rl import ppo_max as F
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.experience import Experience
from rlhf_pipeline.training.engine import world


def rollout_metrics(exp: Experience) -> dict[str, float]:
    """Scores, KL to the reference, perplexity (of the tempered sampling distribution), length in tokens and
    the share of responses cut at ``max_new_tokens`` without EOS."""
    mask = exp.response_mask
    lengths = mask.sum(dim=1)
    kl_per_sequence = (exp.kl * mask).sum(dim=1)
    mean_logprob = F.masked_mean(exp.old_logprobs, mask, dim=1)
    return {
        "reward/raw_score": exp.raw_scores.mean().item(),
        "reward/raw_score_std": exp.raw_scores.std().item() if exp.raw_scores.numel() > 1 else 0.0,
        "reward/score": exp.scores.mean().item(),
        "reward/return": F.masked_mean(exp.returns, mask).item(),
        "reward/advantage": F.masked_mean(exp.advantages, mask).item(),
        "kl/token": F.masked_mean(exp.kl, mask).item(),
        "kl/sequence": kl_per_sequence.mean().item(),
        "response/length": lengths.mean().item(),
        "response/truncated_fraction": exp.truncated.float().mean().item(),
        "response/turn_cut_fraction": exp.turn_cut.float().mean().item() if exp.turn_cut is not None else 0.0,
        "response/perplexity": math.exp(min(-mean_logprob.mean().item(), 50.0)),
    }


class CollapseMonitor:
    """Alarms when the KL to the reference, the perplexity or the response length leave their bounds, relative to
    the first iteration's values where the bound is a ratio (``alarm_*`` settings)."""

    def __init__(self, cfg: PPOConfig, first: dict[str, float] | None = None):
        self.cfg, self.first = cfg, dict(first or {})

    def alarms(self, metrics: dict[str, float]) -> list[str]:
        """The alarms one iteration's ``metrics`` (``rollout_metrics``, averaged over ranks) raise, each a
        sentence naming the value and its bound; empty when every value is within bounds. The first call's
        ``metrics`` are the reference of the ratio bounds, unless ``first`` was given (a resumed run)."""
        cfg, alarms = self.cfg, []
        if not self.first:
            self.first = dict(metrics)
        if cfg.alarm_kl is not None and metrics["kl/sequence"] > cfg.alarm_kl:
            alarms.append(f"KL to reference {metrics['kl/sequence']:.3f} > {cfg.alarm_kl}")
        if cfg.alarm_perplexity_drop is not None and \
                metrics["response/perplexity"] < cfg.alarm_perplexity_drop * self.first["response/perplexity"]:
            alarms.append(f"perplexity {metrics['response/perplexity']:.3f} fell below "
                          f"{cfg.alarm_perplexity_drop} x {self.first['response/perplexity']:.3f}")
        if cfg.alarm_length_growth is not None and \
                metrics["response/length"] > cfg.alarm_length_growth * self.first["response/length"]:
            alarms.append(f"length {metrics['response/length']:.1f} grew past "
                          f"{cfg.alarm_length_growth} x {self.first['response/length']:.1f}")
        return alarms


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """``flag`` OR-ed over the ranks: every rank takes the same decision (one leaving the loop alone would leave
    the others waiting in a collective). ``device``: where this rank's collectives run (NCCL: the GPU)."""
    if world()[1] == 1:
        return flag
    decision = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(decision, op=torch.distributed.ReduceOp.MAX)
    return bool(decision.item())


def sample_records(tokenizer, exp: Experience, count: int, step: int) -> list[dict]:
    """The first ``count`` rollouts of a buffer as text with their RM scores, for the run's sample log."""
    prompts = tokenizer.batch_decode(exp.sequences[:count, :exp.prompt_width], skip_special_tokens=True)
    responses = decode_responses(tokenizer, exp.sequences[:count, exp.prompt_width:])
    return [{"step": step, "prompt": p, "response": r, "rm_score": s}
            for p, r, s in zip(prompts, responses, exp.raw_scores[:count].tolist(), strict=True)]


def mean_over_ranks(metrics: dict[str, float], device: torch.device | str) -> dict[str, float]:
    """Each metric's plain mean over the ranks, so that every rank logs, alarms and checkpoints the same values.
    Each rank's value is over its own rollouts (equal counts on every rank): token-masked means are weighted by
    tokens within a rank only, and ``reward/raw_score_std`` is the mean of the ranks' standard deviations."""
    if world()[1] == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, (values / world()[1]).tolist(), strict=True))
