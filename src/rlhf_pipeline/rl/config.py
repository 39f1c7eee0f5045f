"""The PPO-max settings: every trick is a field (``conf/base/parameters_ppo.yml`` holds the presets)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from rlhf_pipeline.adapters import LoraSettings
from rlhf_pipeline.config import config_from
from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.training.engine import FROZEN_PLACEMENTS, OptimConfig

KL_ESTIMATORS = ("k1", "k3")
SCORE_REPARAMS = ("normalise", "scale", "none")


@dataclass(frozen=True)
class PPOConfig:
    """Every PPO-max trick is a field; ``conf/base/parameters_ppo.yml`` holds the ppo_max and vanilla presets.
    Sections: the algorithm (with its paper section), the rollout, memory, monitoring, checkpointing. Every
    choice is validated here: a value that cannot take effect with the others raises ``ValueError``."""

    # --- the algorithm ------------------------------------------------------------------------------
    iterations: int = 100
    """PPO iterations (one rollout buffer each)."""
    rollout_batch_size: int = 32
    """Prompts rolled out per iteration per rank (the experience buffer)."""
    mini_batch_size: int = 8
    """Rollouts per optimiser step of the policy and the critic."""
    ppo_epochs: int = 1
    """Passes over each buffer, each in a fresh order of mini-batches."""
    score_reparam: Literal["normalise", "scale", "none"] = "normalise"
    """Reparameterisation of RM scores (§5.3.1, Eq. 8): ``normalise`` (running mean/std, then clipped to
    ±``score_clip``), ``scale`` (divided by the running std) or ``none``."""
    score_clip: float | None = 0.8
    """δ of the clip of normalised scores (None: no clip); only with ``score_reparam: normalise``."""
    missing_eos_penalty: float | None = None
    """Subtracted from the RM score of a response cut at ``max_new_tokens`` without EOS (TRL's
    ``missing_eos_penalty``; None: none). Such a response is scored with EOS appended either way."""
    kl_coef: float = 0.05
    """η of the per-token KL penalty to the SFT policy (§5.3.2, Eq. 9; 0 turns it off)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate: ``k1`` (log-ratio) or ``k3`` (Schulman's unbiased, non-negative one)."""
    advantage_normalisation: bool = True
    """Whiten advantages over the buffer's response tokens (§5.3.1)."""
    advantage_clip: float | None = None
    """Clip whitened advantages to ±this (None: no clip)."""
    clip_eps: float = 0.2
    """ε of the clipped policy ratio (Eq. 7)."""
    value_clip: float | None = 0.2
    """Clip of the new values around the old ones in the value loss (§5.3.3; None: no clip)."""
    entropy_coef: float = 0.0
    """w of the entropy term w·|H̄ − target| (off in PPO-max)."""
    entropy_target: float = 0.0
    """The target entropy of that term, nats per token; only with ``entropy_coef`` > 0."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    critic_from_reward_model: bool = True
    """Start the critic from the reward model (§5.3.3) instead of the SFT model under a new value head."""
    critic_warmup_iterations: int = 0
    """Iterations that train only the critic before the policy moves (§5.3.3)."""
    ptx_coef: float = 0.0
    """λ_ptx of the LM loss on SFT data added to the policy loss (PPO-ptx, §5.3.3)."""
    ptx_batch_size: int = 8
    """SFT demonstrations in each mini-batch's PPO-ptx loss."""
    policy_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """The policy's optimiser, schedule and ZeRO stage (its micro-batching is PPO's own, below: its
    ``micro_batch_size`` and ``grad_accum`` are refused)."""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5))
    """The critic's optimiser, schedule and ZeRO stage."""
    seed: int = 0
    """Seeds sampling, mini-batch order, PPO-ptx draws (per rank) and a new value head."""

    # --- the rollout --------------------------------------------------------------------------------
    max_prompt_length: int = 96
    """Prompt tokens kept (the oldest turns go first, see ``formatting``)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How rollouts are sampled; the objective reads the policy at ``sampling.temperature``."""

    # --- memory -------------------------------------------------------------------------------------
    micro_batch_size: int | None = None
    """Rollouts per forward/backward inside a mini-batch (None: the whole mini-batch). Gradients accumulate
    weighted by response tokens, so an update equals the whole mini-batch's; only memory changes."""
    micro_batch_tokens: int | None = None
    """Instead of ``micro_batch_size``: a budget of tokens per micro-batch, so that short rollouts go in
    larger groups than long ones."""
    packing: bool = True
    """Padding-free passes (``training.forward``): each forward packs its rows into rows as wide as the longest
    one. Off: every pass runs over the buffer's full padded width (for comparison)."""
    forward_batch_size: int | None = None
    """Rollouts per scoring forward pass (None: the whole buffer at once; lower it when that does not fit)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters for policy and critic (``r: 0``: off); the reference is then the policy, adapters off."""
    frozen_models: Literal["device", "zero3", "zero3_offload"] = "device"
    """Where the frozen reference and reward model live: ``device`` (whole on each rank), ``zero3``
    (partitioned over the ranks) or ``zero3_offload`` (in CPU memory, streamed in for each forward)."""

    # --- monitoring (§5.2) --------------------------------------------------------------------------
    sample_every: int = 10
    """Iterations between logged sample responses."""
    sample_count: int = 4
    """Responses kept each sampled iteration (the rollout batch: every one, e.g. to score them afterwards)."""
    alarm_kl: float | None = None
    """Alarm when the per-sequence KL to the reference exceeds this."""
    alarm_perplexity_drop: float | None = None
    """Alarm when response perplexity falls below this fraction of its first value."""
    alarm_length_growth: float | None = None
    """Alarm when the mean response length exceeds this multiple of its first value."""
    stop_on_alarm: bool = False
    """Stop at the first alarm on any rank (the last checkpoint before it stays)."""

    # --- checkpointing ------------------------------------------------------------------------------
    checkpoint_every: int = 10
    """Iterations between checkpoints (0: none)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, the latest ones (at 8B a policy + critic checkpoint is ~220 GB)."""

    def __post_init__(self) -> None:
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"ppo.kl_estimator: unknown {self.kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
        if self.score_reparam not in SCORE_REPARAMS:
            raise ValueError(f"ppo.score_reparam: unknown {self.score_reparam!r}; valid: {', '.join(SCORE_REPARAMS)}")
        if self.score_clip is not None and self.score_reparam != "normalise":
            raise ValueError(f"ppo.score_clip clips normalised scores; with score_reparam: {self.score_reparam} it "
                             "cannot take effect: set score_clip: null")
        if self.entropy_target and not self.entropy_coef:
            raise ValueError("ppo.entropy_target is the target of the entropy term, which is off at entropy_coef 0: "
                             "set entropy_coef > 0 or entropy_target: 0")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"ppo.missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")
        for name in ("iterations", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "ptx_batch_size",
                     "keep_checkpoints", "micro_batch_size", "micro_batch_tokens", "forward_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_coef", "ptx_coef", "entropy_coef", "checkpoint_every", "sample_every", "sample_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("clip_eps", "value_clip", "score_clip", "advantage_clip"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"ppo.{name} must be > 0 (null: no clip where allowed), got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.sampling.do_sample:
            raise ValueError("ppo.sampling.do_sample: PPO's objective reads the distribution rollouts are sampled "
                             "from; greedy rollouts have none: set do_sample: true")
        if self.critic_warmup_iterations < 0 or self.critic_warmup_iterations >= self.iterations:
            raise ValueError(f"ppo.critic_warmup_iterations must be in [0, iterations) = [0, {self.iterations}), got "
                             f"{self.critic_warmup_iterations}: the policy would never train")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError("ppo.rollout_batch_size must be a multiple of ppo.mini_batch_size")
        if self.micro_batch_size and self.mini_batch_size % self.micro_batch_size:
            raise ValueError("ppo.mini_batch_size must be a multiple of ppo.micro_batch_size")
        if self.micro_batch_size and self.micro_batch_tokens:
            raise ValueError("ppo: micro_batch_size and micro_batch_tokens are alternatives; set one to null")
        if self.frozen_models not in FROZEN_PLACEMENTS:
            raise ValueError(f"ppo.frozen_models: unknown {self.frozen_models!r}; valid: {', '.join(FROZEN_PLACEMENTS)}")
        defaults = OptimConfig()
        for name, optim in (("policy_optim", self.policy_optim), ("critic_optim", self.critic_optim)):
            if (optim.micro_batch_size, optim.grad_accum) != (defaults.micro_batch_size, defaults.grad_accum):
                raise ValueError(f"ppo.{name}: micro_batch_size and grad_accum cannot take effect in PPO, which steps "
                                 "once per mini_batch_size rollouts split by its own micro_batch_size or "
                                 "micro_batch_tokens: remove them")
        if self.lora.enabled and 3 in (self.policy_optim.zero_stage, self.critic_optim.zero_stage):
            raise ValueError("ppo.lora: LoRA trains with ZeRO stage 0-2 (its trainable state is small); "
                             "use frozen_models: zero3 to partition the frozen weights instead")

    @classmethod
    def from_params(cls, params: dict) -> PPOConfig:
        """The config from YAML parameters or a job file, nested sections included."""
        return config_from(cls, params, sampling=SamplingConfig, policy_optim=OptimConfig, critic_optim=OptimConfig,
                           lora=LoraSettings)


def engine_optims(cfg: PPOConfig) -> tuple[OptimConfig, OptimConfig]:
    """The policy's and the critic's settings as their engines run them: one optimiser step per mini-batch
    (the trainer accumulates its micro-batches itself, see ``PPOTrainer.update``)."""
    mini = {"micro_batch_size": cfg.mini_batch_size, "grad_accum": 1}
    return (OptimConfig(**{**asdict(cfg.policy_optim), **mini}), OptimConfig(**{**asdict(cfg.critic_optim), **mini}))


def json_config(cfg: PPOConfig) -> dict:
    """The config as JSON values (tuples become lists), to compare with a checkpoint's."""
    return json.loads(json.dumps(asdict(cfg)))


def policy_steps(cfg: PPOConfig) -> int:
    """Optimiser steps the policy takes: none during the critic's warm-up iterations."""
    return (cfg.iterations - cfg.critic_warmup_iterations) * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)


def critic_steps(cfg: PPOConfig) -> int:
    """Optimiser steps the critic takes: one per mini-batch of every iteration."""
    return cfg.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
