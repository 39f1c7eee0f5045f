"""The PPO-max loop: experience -> advantages -> critic/policy updates, monitors, checkpoint/resume.

Each iteration runs the named phases ``generate -> score -> advantages -> update`` (timed as
``timing/*``) and logs fixed metric names averaged over every mini-batch: ``reward/*``, ``kl/*``,
``policy/*``, ``value/*``, ``loss/*``, ``response/*``, ``timing/*``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rlhf_pipeline.adapters import AdaptersOff, LoraSettings, add_lora, merge_adapters
from rlhf_pipeline.config import config_from
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig, decode_responses, fit_prompts
from rlhf_pipeline.modeling import ValueHeadModel, disable_dropout, use_fused_gelu
from rlhf_pipeline.rl import ppo_max as F
from rlhf_pipeline.rl.experience import (
    Experience,
    ResponseForward,
    gather_tokens,
    make_experience,
    timer,
)
from rlhf_pipeline.training.batching import collate_encoded, masked_token_nll
from rlhf_pipeline.training.devices import rng_state, set_rng_state
from rlhf_pipeline.training.engine import (
    FROZEN_PLACEMENTS,
    LogFn,
    OptimConfig,
    bf16_enabled,
    deepspeed_config,
    frozen_ds_config,
    grad_norm,
    init_distributed,
    load_whole_weights,
    make_engine,
    make_frozen_engine,
    no_logging,
    release_engine,
    world,
)

logger = logging.getLogger(__name__)


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
        if self.lora.enabled and 3 in (self.policy_optim.zero_stage, self.critic_optim.zero_stage):
            raise ValueError("ppo.lora: LoRA trains with ZeRO stage 0-2 (its trainable state is small); "
                             "use frozen_models: zero3 to partition the frozen weights instead")

    @classmethod
    def from_params(cls, params: dict) -> PPOConfig:
        """The config from YAML parameters or a job file, nested sections included."""
        return config_from(cls, params, sampling=SamplingConfig, policy_optim=OptimConfig, critic_optim=OptimConfig,
                           lora=LoraSettings)


@dataclass
class PPOResult:
    policy: torch.nn.Module
    history: list[dict[str, float]]
    samples: list[dict]
    stopped_early: bool
    prompts_dropped: int = 0
    """Prompts that could not fit ``max_prompt_length`` beside ``max_new_tokens`` in the model's positions."""


def merge_moments(moments: F.RunningMoments, values: torch.Tensor) -> None:
    """Update the running score moments with this step's scores of every rank."""
    # on the scores' device: an NCCL group all-reduces GPU tensors only
    values = values.double()
    stats = torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device), values.sum(),
                         (values**2).sum()])
    if world()[1] > 1:
        torch.distributed.all_reduce(stats)
    count, total, squares = stats.tolist()
    mean = total / count
    moments.update(count, mean, squares - count * mean**2)


def compute_advantages(exp: Experience, cfg: PPOConfig, moments: F.RunningMoments) -> Experience:
    """Reparameterise scores, fold the KL penalty into per-token rewards, run GAE and whiten."""
    merge_moments(moments, exp.raw_scores)
    if cfg.reward_normalisation:
        exp.scores = F.normalise_and_clip_scores(exp.raw_scores, moments.mean, moments.std, cfg.reward_clip)
    elif cfg.reward_scaling:
        exp.scores = exp.raw_scores / (moments.std + F.EPS)
    else:
        exp.scores = exp.raw_scores
    exp.kl = F.kl_estimate(exp.logprobs, exp.ref_logprobs, cfg.kl_estimator) * exp.response_mask
    exp.rewards = F.kl_shaped_rewards(exp.scores, exp.kl, exp.response_mask, cfg.kl_coef)
    exp.advantages, exp.returns = F.gae(exp.rewards, exp.values, exp.response_mask, cfg.gamma, cfg.lam)
    if cfg.advantage_normalisation:
        exp.advantages = F.masked_whiten(exp.advantages, exp.response_mask)
    if cfg.advantage_clip is not None:
        exp.advantages = exp.advantages.clamp(-cfg.advantage_clip, cfg.advantage_clip)
    return exp


class PPOTrainer:
    """Trains ``policy`` against ``reward_model`` with PPO-max; ``reference`` is a frozen copy of the SFT policy."""

    def __init__(self, policy, reward_model: ValueHeadModel, encoder: DialogueEncoder, prompts: list[str], cfg: PPOConfig,
                 checkpoint_dir: str | None = None, ptx_data: tuple[list[str], list[str]] | None = None,
                 log: LogFn = no_logging, score_prior: tuple[float, float, float] | None = None,
                 reference=None, critic: ValueHeadModel | None = None):
        """``encoder`` fits prompts and PPO-ptx demonstrations to the context (rows that cannot fit are dropped);
        ``score_prior``: (count, mean, std) of RM scores measured after RM training, to start the normaliser.
        ``reference`` and ``critic`` (without LoRA): built by the caller, e.g. loaded partitioned by ZeRO-3 ranks
        (``load_configs``), which cannot copy a policy they do not hold whole; by default copies of the policy
        and of the reward model (or of the policy under a new value head)."""
        init_distributed()
        self.cfg, self.tokenizer, self.log = cfg, encoder.tokenizer, log
        self.rank, self.world_size = world()
        torch.manual_seed(cfg.seed + self.rank)
        for model in (policy, reward_model, reference, critic):  # copies of the first two inherit the changes
            if model is not None:
                # old log-probs come from eval mode; with dropout on in training the ratio would start away from 1
                disable_dropout(model)
                use_fused_gelu(model)
        policy, reference, reward_model, critic = self.build_models(policy, reward_model, reference, critic)
        self.generation_copy = None  # ZeRO-3 only: a whole copy that generates (see rollout_policy)
        updates = cfg.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        policy_optim, critic_optim = engine_optims(cfg)
        self.policy = make_engine(policy, policy_optim, updates)
        self.critic = make_engine(critic, critic_optim, updates)
        # the frozen models join the engines on this rank's device, in the policy's precision
        bf16 = self.policy.bfloat16_enabled()
        self.reference = reference if cfg.lora.enabled else make_frozen_engine(reference, cfg.frozen_models, bf16)
        if isinstance(reward_model, AdaptersOff):  # the critic's engine placed the shared weights, not its head
            reward_model.model.value_head.to(self.critic.device)
            self.reward_model = reward_model
        else:
            self.reward_model = make_frozen_engine(reward_model, cfg.frozen_models, bf16)
        kept, self.prompt_ids = fit_prompts(encoder, prompts, cfg.max_prompt_length, cfg.sampling.max_new_tokens)
        if not self.prompt_ids:
            raise ValueError(f"ppo: none of the {len(prompts)} prompts fits max_prompt_length {cfg.max_prompt_length} "
                             f"beside max_new_tokens {cfg.sampling.max_new_tokens}")
        self.prompts_dropped = len(prompts) - len(kept)
        self.ptx_rows = []
        if ptx_data and cfg.ptx_coef:
            rows = encoder.encode_many(ptx_data[0], [[r] for r in ptx_data[1]],
                                       cfg.max_prompt_length + cfg.sampling.max_new_tokens)
            self.ptx_rows = [rows.rows[i] for i in rows.kept]
        self.moments = F.RunningMoments()
        if score_prior:
            count, mean, std = score_prior
            self.moments.update(count, mean, std**2 * count)
        self.iteration = 0
        self.first: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.kept_samples: list[dict] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        if self.checkpoint_dir and (self.checkpoint_dir / "complete").exists():
            logger.info("%s holds a finished run: starting afresh", self.checkpoint_dir)
            if self.rank == 0:
                shutil.rmtree(self.checkpoint_dir)
            if self.world_size > 1:
                torch.distributed.barrier()
        elif self.checkpoint_dir and (self.checkpoint_dir / "latest").exists():
            self.load_checkpoint()

    def build_models(self, policy, reward_model, reference=None, critic=None):
        """``(policy, reference, reward model, critic)`` before the engines exist. With LoRA, the policy gets
        adapters and the reference is the policy with them off; a critic from the reward model gets its own
        adapters and value head on the reward model's base weights, which the reward model scores with."""
        cfg = self.cfg
        if not cfg.lora.enabled:
            if reference is None:
                reference = copy.deepcopy(policy)
            if critic is None:
                critic = copy.deepcopy(reward_model) if cfg.critic_from_reward_model else \
                    ValueHeadModel(copy.deepcopy(policy), seed=cfg.seed)
            critic.requires_grad_(True)
            if isinstance(critic, ValueHeadModel):
                critic.freeze_unused_lm_head()
            return policy, reference, reward_model, critic
        if reference is not None or critic is not None:
            raise ValueError("ppo.lora: the reference is the policy with its adapters off and the critic shares "
                             "the base weights; they cannot be passed in")
        if cfg.critic_from_reward_model:
            if not isinstance(reward_model, ValueHeadModel):
                raise TypeError("ppo.lora with critic_from_reward_model needs a ValueHeadModel reward model")
            head = copy.deepcopy(reward_model.value_head).requires_grad_(True)
            critic = ValueHeadModel(disable_dropout(add_lora(reward_model.lm, cfg.lora)), value_head=head)
            reward_model = AdaptersOff(ValueHeadModel(critic.lm, value_head=reward_model.value_head.requires_grad_(False)))
        else:
            critic = ValueHeadModel(disable_dropout(add_lora(copy.deepcopy(policy), cfg.lora)), seed=cfg.seed)
        policy = disable_dropout(add_lora(policy, cfg.lora))
        return policy, AdaptersOff(policy), reward_model, critic.freeze_unused_lm_head()

    # --- the loop ------------------------------------------------------------------------------
    def prompt_batch(self) -> list[int]:
        """This rank's share of the prompts for the current iteration (a seeded pass over the prompts)."""
        per_iteration = self.cfg.rollout_batch_size * self.world_size
        epoch, offset = divmod(self.iteration * per_iteration, len(self.prompt_ids))
        order = list(range(len(self.prompt_ids)))
        random.Random(self.cfg.seed + epoch).shuffle(order)
        order = order + order  # a batch may wrap past the end of a pass
        chosen = order[offset:offset + per_iteration]
        return chosen[self.rank::self.world_size]

    def train(self) -> PPOResult:
        stopped = False
        progress = tqdm(total=self.cfg.iterations, initial=self.iteration, desc="ppo", disable=self.rank != 0)
        while self.iteration < self.cfg.iterations:
            metrics, exp = self.step()
            self.iteration += 1
            self.history.append({"step": self.iteration, **metrics})
            self.log(metrics, self.iteration)
            if self.cfg.sample_every and self.iteration % self.cfg.sample_every == 0:
                self.kept_samples.extend(self.samples(exp, self.cfg.sample_count))
            progress.update(1)
            progress.set_postfix(score=f"{metrics['reward/raw_score']:.3f}", kl=f"{metrics['kl/sequence']:.3f}")
            alarms = self.alarms(metrics)
            if alarms:
                logger.warning("Collapse alarm at iteration %d: %s", self.iteration, "; ".join(alarms))
            if self.cfg.stop_on_alarm and self.any_rank(bool(alarms)):
                stopped = True
                logger.warning("Stopping early; the last checkpoint before the alarm is kept")
                break
            if self.checkpoint_dir and self.cfg.checkpoint_every and self.iteration % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
        progress.close()
        if self.checkpoint_dir and self.rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (self.checkpoint_dir / "complete").write_text(str(self.iteration))  # the next run starts afresh
        policy = self.trained_policy()
        release_engine(self.critic)  # optimizer states go now, not when the policy does
        release_engine(self.policy)
        return PPOResult(policy, self.history, self.kept_samples, stopped, self.prompts_dropped)

    def trained_policy(self) -> torch.nn.Module:
        """The policy with whole weights (every rank must call this): under ZeRO-3 the whole copy; with LoRA
        the adapters merged into the base weights."""
        if self.cfg.policy_optim.zero_stage == 3:
            return self.rollout_policy().requires_grad_(True)
        return merge_adapters(self.policy.module)

    def rollout_policy(self) -> torch.nn.Module:
        """The model that generates. Under ZeRO-3, a whole copy refreshed once per rollout (every rank calls
        this): generating from the partitioned engine would all-gather every layer for every new token,
        and ranks whose rows hit EOS at different steps would wait for each other in those all-gathers.
        The copy is built on the device from the policy's config, never as a whole copy in host memory."""
        if self.cfg.policy_optim.zero_stage != 3:
            return self.policy.module
        if self.generation_copy is None:
            partitioned, device = self.policy.module, torch.device(self.policy.device)
            # its random initialisation, overwritten below, must not move the sampling RNG
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
                self.generation_copy = type(partitioned)._from_config(
                    partitioned.config, dtype=torch.bfloat16 if self.policy.bfloat16_enabled() else None)
            self.generation_copy.generation_config = copy.deepcopy(partitioned.generation_config)  # e.g. its EOS ids
            self.generation_copy.eval().requires_grad_(False)
        load_whole_weights(self.policy, self.generation_copy)
        return self.generation_copy

    def step(self) -> tuple[dict[str, float], Experience]:
        cfg, timings = self.cfg, {}
        prompt_ids = [self.prompt_ids[i] for i in self.prompt_batch()]
        self.policy.eval()
        with timer("gather", timings):
            generator = self.rollout_policy()
        exp = make_experience(self.policy.module, self.reference, self.critic.module, self.reward_model, self.tokenizer,
                              prompt_ids, cfg.sampling, timings, generator=generator,
                              forward_batch_size=cfg.forward_batch_size, packing=cfg.packing)
        with timer("advantages", timings):
            exp = compute_advantages(exp, cfg, self.moments)
        with timer("update", timings):
            update_metrics = self.update(exp)
        n_tokens = exp.response_mask.sum().item()
        metrics = {
            **rollout_metrics(exp), **update_metrics, **timings,
            "timing/total": sum(timings.values()),
            "timing/tokens_per_s": n_tokens / max(sum(timings.values()), 1e-9),
            "timing/generate_tokens_per_s": n_tokens / max(timings["timing/generate"], 1e-9),
        }
        return metrics, exp

    def update(self, exp: Experience) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches; the critic always trains, the policy after warm-up. A
        mini-batch runs as micro-batches (``micro_batches``) whose losses are weighted by their share of its
        response tokens and whose gradients accumulate to one optimiser step, so the update is the mini-batch's
        however it is split, packed or padded."""
        cfg = self.cfg
        train_policy = self.iteration >= cfg.critic_warmup_iterations
        engines = (self.critic, self.policy) if train_policy else (self.critic,)
        records: list[tuple[torch.Tensor | float, dict[str, torch.Tensor]]] = []  # (share of tokens, metrics)
        real = computed = 0
        self.policy.train()
        self.critic.train()
        for _ in range(cfg.ppo_epochs):
            for index in torch.randperm(exp.sequences.shape[0]).split(cfg.mini_batch_size):
                batch = exp.select(index)
                tokens = batch.response_mask.sum().clamp(min=1.0)
                parts = self.micro_batches(batch)
                for number, part in enumerate(parts):
                    micro_batch = batch.select(part)
                    forward = ResponseForward.of(micro_batch, cfg.packing)
                    real, computed = real + micro_batch.attention_mask.sum(), computed + forward.computed_tokens
                    share = micro_batch.response_mask.sum() / tokens
                    for engine in engines:  # only the last backward of a mini-batch reduces and steps
                        engine.set_gradient_accumulation_boundary(number == len(parts) - 1)
                    records.append((share, self.critic_update(micro_batch, forward, share)))
                    if train_policy:
                        records.append((share, self.policy_update(micro_batch, forward, share, with_ptx=number == 0)))
                for engine in engines:
                    engine.step()
                records.append((1.0, {"value/grad_norm": grad_norm(self.critic)}))  # read at the optimiser step
                if train_policy:
                    records.append((1.0, {"policy/grad_norm": grad_norm(self.policy)}))
        records = [(float(w), {k: float(torch.as_tensor(v).detach()) for k, v in r.items()}) for w, r in records]
        keys = dict.fromkeys(key for _, record in records for key in record)
        metrics = {key: sum(w * r[key] for w, r in records if key in r) / sum(w for w, r in records if key in r)
                   for key in keys}
        return {**metrics, "update/real_token_share": float(real) / max(computed, 1)}

    def micro_batches(self, batch: Experience) -> list[torch.Tensor]:
        """Row indices of a mini-batch's micro-batches: ``micro_batch_size`` rows each, or, with
        ``micro_batch_tokens``, consecutive rows while their tokens (their padded width when not packing)
        stay within the budget, so that short rollouts go in larger groups than long ones."""
        cfg = self.cfg
        if not cfg.micro_batch_tokens:
            return list(torch.arange(len(batch.sequences)).split(cfg.micro_batch_size or cfg.mini_batch_size))
        lengths = batch.attention_mask.sum(dim=1).tolist() if cfg.packing else [batch.sequences.shape[1]] * len(batch.sequences)
        parts, current, used = [], [], 0
        for row, length in enumerate(lengths):
            if current and used + length > cfg.micro_batch_tokens:
                parts.append(current)
                current, used = [], 0
            current.append(row)
            used += length
        parts.append(current)
        return [torch.tensor(part) for part in parts]

    def critic_update(self, batch: Experience, forward: ResponseForward, weight: torch.Tensor | float = 1.0
                      ) -> dict[str, torch.Tensor]:
        values = forward.scatter(forward.token_values(self.critic))
        loss, metrics = F.value_loss(values, batch.values, batch.returns, batch.response_mask, self.cfg.value_clip)
        self.critic.backward(loss * weight)
        return {"loss/value": loss.detach(),
                "value/explained_variance": F.explained_variance(values.detach(), batch.returns, batch.response_mask),
                **metrics}

    def policy_update(self, batch: Experience, forward: ResponseForward, weight: torch.Tensor | float = 1.0,
                      with_ptx: bool = True) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        # one log-softmax over the vocabulary serves both the ratio and the entropy
        log_probs = torch.log_softmax(forward.token_logits(self.policy).float(), dim=-1)  # (K, V)
        logprobs = forward.scatter(gather_tokens(log_probs, forward.tokens))
        loss, metrics = F.policy_loss(logprobs, batch.logprobs, batch.advantages, batch.response_mask, cfg.clip_eps)
        # without an entropy bonus the entropy is only monitored: no autograd graph over the vocabulary
        with torch.set_grad_enabled(bool(cfg.entropy_coef)):
            entropy = F.masked_mean(forward.scatter(F.entropy(log_probs)), batch.response_mask)
        out = {"loss/policy": loss.detach(), "policy/entropy": entropy.detach()}
        if cfg.entropy_coef:
            loss = loss + cfg.entropy_coef * (entropy - cfg.entropy_target).abs()
        loss = loss * weight
        if cfg.ptx_coef and self.ptx_rows and with_ptx:  # once per mini-batch, at full weight
            ptx_loss = self.ptx_loss()
            loss = loss + cfg.ptx_coef * ptx_loss
            out["loss/ptx"] = ptx_loss.detach()
        self.policy.backward(loss)
        return {**out, **metrics}

    def ptx_loss(self) -> torch.Tensor:
        """LM loss on a random batch of SFT demonstrations (PPO-ptx)."""
        rows = random.Random(self.cfg.seed * 7919 + self.iteration).sample(self.ptx_rows,
                                                                           min(self.cfg.ptx_batch_size, len(self.ptx_rows)))
        batch = collate_encoded(rows, self.tokenizer.pad_token_id).to(self.policy.device)
        logits = self.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        total, count = masked_token_nll(logits, batch.input_ids, batch.response_mask)
        return total / count.clamp(min=1.0)

    # --- monitors --------------------------------------------------------------------------------
    def any_rank(self, flag: bool) -> bool:
        """``flag`` OR-ed over the ranks: every rank takes the same decision (one leaving the loop alone would
        leave the others waiting in a collective)."""
        if self.world_size == 1:
            return flag
        decision = torch.tensor(float(flag), device=self.policy.device)
        torch.distributed.all_reduce(decision, op=torch.distributed.ReduceOp.MAX)
        return bool(decision.item())

    def alarms(self, metrics: dict[str, float]) -> list[str]:
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

    def samples(self, exp: Experience, count: int) -> list[dict]:
        prompts = self.tokenizer.batch_decode(exp.sequences[:count, :exp.prompt_width], skip_special_tokens=True)
        responses = decode_responses(self.tokenizer, exp.sequences[:count, exp.prompt_width:])
        return [{"step": self.iteration, "prompt": p, "response": r, "rm_score": s}
                for p, r, s in zip(prompts, responses, exp.raw_scores[:count].tolist(), strict=True)]

    # --- checkpoint / resume -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Engines (weights, optimiser, scheduler) via DeepSpeed; trainer state as JSON + safetensors."""
        tag = f"iteration_{self.iteration}"
        self.policy.save_checkpoint(str(self.checkpoint_dir / "policy"), tag=tag)
        self.critic.save_checkpoint(str(self.checkpoint_dir / "critic"), tag=tag)
        if self.rank == 0:
            state = {"iteration": self.iteration, "moments": self.moments.state_dict(), "first": self.first,
                     "history": self.history, "samples": self.kept_samples, "config": json_config(self.cfg)}
            (self.checkpoint_dir / f"{tag}.json").write_text(json.dumps(state))
            save_file(rng_state(), str(self.checkpoint_dir / f"{tag}_rng.safetensors"))
            (self.checkpoint_dir / "latest").write_text(tag)
            self.prune_checkpoints()
        logger.info("Saved checkpoint %s", tag)

    def prune_checkpoints(self) -> None:
        """Delete all but the latest ``keep_checkpoints`` checkpoints (engines' folders and trainer state)."""
        tags = sorted((int(p.stem.split("_")[1]) for p in self.checkpoint_dir.glob("iteration_*.json")), reverse=True)
        for iteration in tags[max(self.cfg.keep_checkpoints, 1):]:
            tag = f"iteration_{iteration}"
            for engine in ("policy", "critic"):
                shutil.rmtree(self.checkpoint_dir / engine / tag, ignore_errors=True)
            for path in (self.checkpoint_dir / f"{tag}.json", self.checkpoint_dir / f"{tag}_rng.safetensors"):
                path.unlink(missing_ok=True)

    def load_checkpoint(self) -> None:
        tag = (self.checkpoint_dir / "latest").read_text().strip()
        state = json.loads((self.checkpoint_dir / f"{tag}.json").read_text())
        changed = sorted(k for k, v in json_config(self.cfg).items() if state.get("config", {}).get(k) != v)
        if changed:
            raise ValueError(f"{self.checkpoint_dir} holds an unfinished run with other settings ({', '.join(changed)}); "
                             "resume with the same parameters, or set checkpoint_dir to a new folder")
        # DeepSpeed's loader reads files this trainer wrote itself; it is never pointed at downloaded data.
        self.policy.load_checkpoint(str(self.checkpoint_dir / "policy"), tag=tag)
        self.critic.load_checkpoint(str(self.checkpoint_dir / "critic"), tag=tag)
        self.iteration, self.first, self.history = state["iteration"], state["first"], state["history"]
        self.kept_samples = state.get("samples", [])
        self.moments.load_state_dict(state["moments"])
        set_rng_state(load_file(str(self.checkpoint_dir / f"{tag}_rng.safetensors")))
        logger.info("Resumed from checkpoint %s", tag)


def engine_optims(cfg: PPOConfig) -> tuple[OptimConfig, OptimConfig]:
    """The policy's and the critic's settings as their engines run them: one optimiser step per mini-batch
    (the trainer accumulates its micro-batches itself, see ``PPOTrainer.update``)."""
    mini = {"micro_batch_size": cfg.mini_batch_size, "grad_accum": 1}
    return (OptimConfig(**{**asdict(cfg.policy_optim), **mini}), OptimConfig(**{**asdict(cfg.critic_optim), **mini}))


def load_configs(cfg: PPOConfig) -> dict[str, dict | None]:
    """The DeepSpeed config that each of the run's models (``policy``, ``critic``, ``frozen``: the reference and
    the reward model) is loaded under with ``partitioned_loading``: ranks then hold only their partition of a
    ZeRO-3 model from the moment it is read."""
    policy_optim, critic_optim = engine_optims(cfg)
    # zero.Init reads the ZeRO section and the precision; the step count does not matter to it
    return {"policy": deepspeed_config(policy_optim, 1), "critic": deepspeed_config(critic_optim, 1),
            "frozen": frozen_ds_config(cfg.frozen_models, bf16_enabled(cfg.policy_optim.bf16))}


def json_config(cfg: PPOConfig) -> dict:
    """The config as JSON values (tuples become lists), to compare with a checkpoint's."""
    return json.loads(json.dumps(asdict(cfg)))


def rollout_metrics(exp: Experience) -> dict[str, float]:
    """Monitors of the rollouts (§5.2): scores, KL to the reference, perplexity, length."""
    mask = exp.response_mask
    lengths = mask.sum(dim=1)
    kl_per_sequence = (exp.kl * mask).sum(dim=1)
    mean_logprob = F.masked_mean(exp.logprobs, mask, dim=1)
    return {
        "reward/raw_score": exp.raw_scores.mean().item(),
        "reward/raw_score_std": exp.raw_scores.std().item() if exp.raw_scores.numel() > 1 else 0.0,
        "reward/score": exp.scores.mean().item(),
        "reward/return": F.masked_mean(exp.returns, mask).item(),
        "reward/advantage": F.masked_mean(exp.advantages, mask).item(),
        "kl/token": F.masked_mean(exp.kl, mask).item(),
        "kl/sequence": kl_per_sequence.mean().item(),
        "response/length": lengths.mean().item(),
        "response/perplexity": math.exp(min(-mean_logprob.mean().item(), 50.0)),
    }
