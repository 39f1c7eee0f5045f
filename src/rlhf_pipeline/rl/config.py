"""The PPO-max settings: every trick is a field (``conf/base/parameters_ppo.yml`` holds the presets)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from rlhf_pipeline.adapters import LoraSettings
from rlhf_pipeline.config import config_from
from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.training.engine import FROZEN_PLACEMENTS, OptimConfig


@dataclass(frozen=True)
class PPOConfig:
    """Every PPO-max trick is a field; ``conf/base/parameters_ppo.yml`` holds the ppo_max and vanilla presets."""

    iterations: int = 100
    """PPO iterations (one rollout buffer each)."""
    rollout_batch_size: int = 32
    """Prompts rolled out per iteration per rank (the experience buffer)."""
    mini_batch_size: int = 8
    micro_batch_size: int | None = None
    """Rollouts per forward/backward inside a mini-batch (None: the whole mini-batch). Gradients accumulate
    weighted by response tokens, so an update equals the whole mini-batch's; only memory changes."""
    micro_batch_tokens: int | None = None
    """Instead of ``micro_batch_size``: a budget of tokens per micro-batch, so that short rollouts go in
    larger groups than long ones."""
    packing: bool = True
    """Padding-free passes (see ``experience``): each forward packs its rows into rows as wide as the longest
    one. Off: every pass runs over the buffer's full padded width (for comparison)."""
    ppo_epochs: int = 1
    forward_batch_size: int | None = None
    """Rollouts per scoring forward pass (None: the whole buffer at once; lower it when that does not fit)."""
    max_prompt_length: int = 96
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    kl_coef: float = 0.05
    """η of the per-token KL penalty to the SFT policy (0 turns it off)."""
    kl_estimator: str = "k1"
    reward_normalisation: bool = True
    """Running mean/std normalisation of RM scores."""
    reward_clip: float | None = 0.8
    """δ of the normalised-score clip (None: no clip)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the RM score of a response cut at ``max_new_tokens`` without EOS (TRL's
    ``missing_eos_penalty``; None: none). Such a response is scored with EOS appended either way."""
    reward_scaling: bool = False
    """Divide scores by their running std (the paper's alternative; exclusive with normalisation)."""
    advantage_normalisation: bool = True
    advantage_clip: float | None = None
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    entropy_coef: float = 0.0
    """w of the entropy term w·|H̄ − target| (off in PPO-max)."""
    entropy_target: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    critic_from_reward_model: bool = True
    critic_warmup_iterations: int = 0
    """Iterations that train only the critic before the policy moves."""
    ptx_coef: float = 0.0
    """λ_ptx of the LM loss on SFT data added to the policy loss (PPO-ptx)."""
    ptx_batch_size: int = 8
    policy_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5))
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters for policy and critic (``r: 0``: off); the reference is then the policy, adapters off."""
    frozen_models: str = "device"
    """Where the frozen reference and reward model live: ``device`` (whole on each rank), ``zero3``
    (partitioned over the ranks) or ``zero3_offload`` (in CPU memory, streamed in for each forward)."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (0: none)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, the latest ones (at 8B a policy + critic checkpoint is ~220 GB)."""
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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"ppo.kl_estimator: unknown {self.kl_estimator!r}; valid: k1, k3")
        if self.reward_normalisation and self.reward_scaling:
            raise ValueError("ppo: reward_normalisation and reward_scaling are alternatives; turn one off")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError("ppo.rollout_batch_size must be a multiple of ppo.mini_batch_size")
        if self.micro_batch_size and self.mini_batch_size % self.micro_batch_size:
            raise ValueError("ppo.mini_batch_size must be a multiple of ppo.micro_batch_size")
        if self.micro_batch_size and self.micro_batch_tokens:
            raise ValueError("ppo: micro_batch_size and micro_batch_tokens are alternatives; set one to null")
        if self.frozen_models not in FROZEN_PLACEMENTS:
            raise ValueError(f"ppo.frozen_models: unknown {self.frozen_models!r}; valid: {', '.join(FROZEN_PLACEMENTS)}")
        if self.reward_clip is not None and not self.reward_normalisation:
            raise ValueError("ppo.reward_clip clips normalised scores; with reward_normalisation off it cannot take "
                             "effect: set reward_clip: null")
        if self.entropy_target and not self.entropy_coef:
            raise ValueError("ppo.entropy_target is the target of the entropy term, which is off at entropy_coef 0: "
                             "set entropy_coef > 0 or entropy_target: 0")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"ppo.missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")
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
    return max(cfg.iterations - cfg.critic_warmup_iterations, 0) * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)


def critic_steps(cfg: PPOConfig) -> int:
    """Optimiser steps the critic takes: one per mini-batch of every iteration."""
    return cfg.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
