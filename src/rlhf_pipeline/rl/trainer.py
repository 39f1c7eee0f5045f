"""The PPO-max loop: each iteration runs ``generate -> score -> advantages -> update``.

``step`` is one iteration: roll out a buffer (``experience``), reparameterise the RM scores and fold the KL
penalty into per-token rewards, run GAE (``compute_advantages``), then PPO epochs over mini-batches
(``update``). Models come from ``rl.models``, settings from ``rl.config``, checkpoints from ``rl.checkpoint``,
monitors from ``rl.monitors``; the maths is ``rl.ppo_max``. Logged names, averaged over every mini-batch:
``reward/*``, ``kl/*``, ``policy/*``, ``value/*``, ``loss/*``, ``response/*``, ``timing/*``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf_pipeline.adapters import merge_adapters
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import fit_prompts
from rlhf_pipeline.modeling import ValueHeadModel
from rlhf_pipeline.rl import ppo_max as F
from rlhf_pipeline.rl.checkpoint import CheckpointStore, resume_conflicts
from rlhf_pipeline.rl.config import PPOConfig, json_config
from rlhf_pipeline.rl.experience import Experience, compute_advantages, make_experience, timer
from rlhf_pipeline.rl.models import GenerationCopy, build_models, fingerprint, make_engines
from rlhf_pipeline.rl.monitors import (
    CollapseMonitor,
    any_rank,
    mean_over_ranks,
    rollout_metrics,
    sample_records,
)
from rlhf_pipeline.training.batching import collate_encoded
from rlhf_pipeline.training.devices import rng_state, set_rng_state
from rlhf_pipeline.training.engine import (
    LogFn,
    all_ranks_sum,
    grad_norm,
    init_distributed,
    no_logging,
    release_engine,
    world,
)
from rlhf_pipeline.training.forward import ResponseForward, gather_tokens, token_groups

logger = logging.getLogger(__name__)

PTX_SEED_STRIDE = 7919
"""Seeds of the PPO-ptx generators: ``PTX_SEED_STRIDE * seed + rank`` (a prime: no two (seed, rank) pairs of a
run on fewer ranks than it collide)."""


@dataclass
class PPOResult:
    """What a PPO run returns (``PPOTrainer.train``, ``launch.run_ppo``)."""

    policy: torch.nn.Module
    """The trained policy with whole weights (LoRA adapters merged into them)."""
    history: list[dict[str, float]]
    """One record per iteration: its ``step`` and metrics, averaged over the ranks."""
    samples: list[dict]
    """Rollouts kept every ``sample_every`` iterations: ``step``, ``prompt``, ``response`` and ``rm_score``."""
    stopped_early: bool
    """Whether a collapse alarm stopped the run (``stop_on_alarm``)."""
    prompts_dropped: int = 0
    """Prompts that could not fit ``max_prompt_length`` beside ``max_new_tokens`` in the model's positions."""


class PPOTrainer:
    """Trains ``policy`` against ``reward_model`` with PPO-max; the reference is the SFT policy, frozen."""

    def __init__(self, policy, reward_model: ValueHeadModel, encoder: DialogueEncoder, prompts: list[str], cfg: PPOConfig,
                 checkpoint_dir: str | None = None, ptx_data: tuple[list[str], list[str]] | None = None,
                 log: LogFn = no_logging, score_prior: tuple[float, float, float] | None = None,
                 reference=None, critic: ValueHeadModel | None = None):
        """The run owns ``policy`` and ``reward_model`` (see ``models.build_models``): it trains, moves and casts
        them, so a caller that keeps using its models passes copies. ``encoder`` fits prompts and PPO-ptx
        demonstrations to the context (rows that cannot fit are dropped); ``score_prior``: (count, mean, std) of
        RM scores measured after RM training, to start the normaliser; ``reference`` and ``critic`` (without
        LoRA): loaded by ``models.load_models``, e.g. partitioned by ZeRO-3 ranks.

        Raises:
            ValueError: no prompt fits, fewer prompts than one iteration's buffer over all ranks, or a
                checkpoint in ``checkpoint_dir`` that this run cannot continue (the message names what changed).
        """
        init_distributed()
        self.cfg, self.tokenizer, self.log = cfg, encoder.tokenizer, log
        self.sampling = encoder.sampling(cfg.sampling)  # the hh format stops rollouts at a new turn
        self.rank, self.world_size = world()
        torch.manual_seed(cfg.seed + self.rank)
        # one position more than sampled: a truncated response is scored with EOS appended (see experience)
        kept, self.prompt_ids = fit_prompts(encoder, prompts, cfg.max_prompt_length, cfg.sampling.max_new_tokens + 1)
        if not self.prompt_ids:
            raise ValueError(f"ppo: none of the {len(prompts)} prompts fits max_prompt_length {cfg.max_prompt_length} "
                             f"beside max_new_tokens {cfg.sampling.max_new_tokens}")
        if len(self.prompt_ids) < cfg.rollout_batch_size * self.world_size:
            raise ValueError(f"ppo: {len(self.prompt_ids)} prompts fit, fewer than one iteration's buffer "
                             f"(rollout_batch_size {cfg.rollout_batch_size} x {self.world_size} rank(s)); give more "
                             "prompts (data_processing.split.fractions.ppo_prompts) or lower ppo.rollout_batch_size")
        self.prompts_dropped = len(prompts) - len(kept)
        # what a checkpoint of this run must have been made with (before the models are wrapped or cast)
        self.inputs = fingerprint(policy, reward_model, self.tokenizer, self.prompt_ids) if checkpoint_dir else {}
        engines = make_engines(build_models(policy, reward_model, cfg, reference, critic), cfg)
        self.policy, self.critic = engines.policy, engines.critic
        self.reference, self.reward_model = engines.reference, engines.reward_model
        self.generation_copy = GenerationCopy()  # ZeRO-3 only: a whole copy that generates
        self.ptx_rows = []
        if ptx_data and cfg.ptx_coef:
            rows = encoder.encode_many(ptx_data[0], [[r] for r in ptx_data[1]],
                                       cfg.max_prompt_length + cfg.sampling.max_new_tokens)
            self.ptx_rows = [rows.rows[i] for i in rows.kept]
        # each rank draws its own PPO-ptx batches, a new one per mini-batch; the state is checkpointed
        self.ptx_generator = torch.Generator().manual_seed(PTX_SEED_STRIDE * cfg.seed + self.rank)
        self.moments = F.RunningMoments()
        if score_prior:
            count, mean, std = score_prior
            self.moments.update(count, mean, std**2 * count)
        self.iteration = 0
        self.monitor = CollapseMonitor(cfg)
        self.history: list[dict[str, float]] = []
        self.kept_samples: list[dict] = []
        self.store = CheckpointStore(checkpoint_dir, cfg.keep_checkpoints) if checkpoint_dir else None
        self.resumed = bool(self.store and self.store.latest())
        if self.resumed:
            self.resume(self.store.latest())

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
        """Run ``step`` until ``iterations`` (or a collapse alarm with ``stop_on_alarm``); save checkpoints on the
        way and return the trained policy with whole weights."""
        cfg, stopped = self.cfg, False
        if self.store and not self.resumed:
            self.store.clear()
        progress = tqdm(total=cfg.iterations, initial=self.iteration, desc="ppo", disable=self.rank != 0)
        while self.iteration < cfg.iterations:
            metrics, exp = self.step()
            metrics = mean_over_ranks(metrics, self.policy.device)  # every rank logs, alarms and saves the same
            self.history.append({"step": self.iteration, **metrics})
            self.log(metrics, self.iteration)
            if cfg.sample_every and self.iteration % cfg.sample_every == 0:
                self.kept_samples.extend(sample_records(self.tokenizer, exp, cfg.sample_count, self.iteration))
            progress.update(1)
            progress.set_postfix(score=f"{metrics['reward/raw_score']:.3f}", kl=f"{metrics['kl/sequence']:.3f}")
            alarms = self.monitor.alarms(metrics)
            if alarms:
                logger.warning("Collapse alarm at iteration %d: %s", self.iteration, "; ".join(alarms))
            if cfg.stop_on_alarm and any_rank(bool(alarms), self.policy.device):
                stopped = True
                logger.warning("Stopping early; the last checkpoint before the alarm is kept")
                break
            if self.store and cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        progress.close()
        if self.store:
            self.store.mark_complete(self.iteration)
        policy = self.trained_policy()
        release_engine(self.critic)  # optimizer states go now, not when the policy does
        release_engine(self.policy)
        return PPOResult(policy, self.history, self.kept_samples, stopped, self.prompts_dropped)

    def step(self) -> tuple[dict[str, float], Experience]:
        """One iteration: generate -> score -> advantages -> update; returns its metrics and the buffer and
        advances ``iteration``."""
        cfg, timings = self.cfg, {}
        prompt_ids = [self.prompt_ids[i] for i in self.prompt_batch()]
        self.policy.eval()
        with timer("gather", timings):
            generator = self.rollout_policy()
        exp = make_experience(self.policy.module, self.reference, self.critic.module, self.reward_model, self.tokenizer,
                              prompt_ids, self.sampling, timings, generator=generator,
                              forward_batch_size=cfg.forward_batch_size, packing=cfg.packing)
        with timer("advantages", timings):
            exp = compute_advantages(exp, cfg, self.moments)
        with timer("update", timings):
            update_metrics = self.update(exp)
        self.iteration += 1
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
                tokens = all_ranks_sum(batch.response_mask.sum(), self.policy.device).clamp(min=1.0)
                parts = self.micro_batches(batch)
                for number, part in enumerate(parts):
                    micro_batch = batch.select(part)
                    forward = ResponseForward.of(micro_batch, cfg.packing)
                    real, computed = real + micro_batch.attention_mask.sum(), computed + forward.computed_tokens
                    # DeepSpeed averages gradients over ranks: x world size makes them the all-rank token mean
                    share = micro_batch.response_mask.sum() * self.world_size / tokens
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
        stay within the budget, so that short rollouts go in larger groups than long ones. Every rank runs as
        many micro-batches (ZeRO communicates in each backward): a rank with fewer splits its largest ones."""
        cfg = self.cfg
        if not cfg.micro_batch_tokens:
            return list(torch.arange(len(batch.sequences)).split(cfg.micro_batch_size or cfg.mini_batch_size))
        lengths = batch.attention_mask.sum(dim=1).tolist() if cfg.packing else [batch.sequences.shape[1]] * len(batch.sequences)
        parts = token_groups(lengths, cfg.micro_batch_tokens)
        count = len(parts)
        if self.world_size > 1:
            most = torch.tensor(float(count), device=self.policy.device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            count = int(most.item())
        while len(parts) < count:  # every rank holds mini_batch_size >= count rows: some part has two or more
            largest = max(range(len(parts)), key=lambda i: len(parts[i]))
            part = parts.pop(largest)
            parts[largest:largest] = [part[: len(part) // 2], part[len(part) // 2 :]]
        return [torch.tensor(part) for part in parts]

    def critic_update(self, batch: Experience, forward: ResponseForward, weight: torch.Tensor | float = 1.0
                      ) -> dict[str, torch.Tensor]:
        """Backward one micro-batch's value loss (``ppo_max.value_loss``, clipped by ``value_clip``) times
        ``weight``; the critic's optimiser steps in ``update``.

        Args:
            batch: The micro-batch's rollouts.
            forward: The pass over ``batch`` (packed or padded).
            weight: The micro-batch's share of the mini-batch's response tokens over all ranks, times the world
                size (DeepSpeed averages gradients over ranks).

        Returns:
            ``loss/value``, ``value/explained_variance``, ``value/clipfrac`` and ``value/mean`` (not weighted).
        """
        values = forward.scatter(forward.token_values(self.critic))
        loss, metrics = F.value_loss(values, batch.old_values, batch.returns, batch.response_mask, self.cfg.value_clip)
        self.critic.backward(loss * weight)
        return {"loss/value": loss.detach(),
                "value/explained_variance": F.explained_variance(values.detach(), batch.returns, batch.response_mask),
                **metrics}

    def policy_update(self, batch: Experience, forward: ResponseForward, weight: torch.Tensor | float = 1.0,
                      with_ptx: bool = True) -> dict[str, torch.Tensor]:
        """Backward one micro-batch's policy loss: the clipped surrogate (``ppo_max.policy_loss``) on the
        log-probs of the tempered logits, plus ``entropy_coef * |H - entropy_target|`` when ``entropy_coef`` is
        set, times ``weight``; with ``with_ptx`` (and ``ptx_coef`` and demonstrations), plus ``ptx_coef`` times
        the PPO-ptx loss (``ptx_loss``) at full weight. The policy's optimiser steps in ``update``.

        Args:
            batch: The micro-batch's rollouts.
            forward: The pass over ``batch`` (packed or padded).
            weight: The micro-batch's share of the mini-batch's tokens (see ``critic_update``).
            with_ptx: Add the PPO-ptx term (``update`` adds it with a mini-batch's first micro-batch only).

        Returns:
            ``loss/policy`` (the surrogate alone), ``policy/entropy`` (mean over response tokens), ``loss/ptx``
                where it was added, ``policy/clipfrac``, ``policy/approx_kl`` and ``policy/ratio`` (not weighted).
        """
        cfg = self.cfg
        # one log-softmax over the tempered vocabulary serves both the ratio and the entropy
        log_probs = torch.log_softmax(forward.token_logits(self.policy, cfg.sampling.temperature), dim=-1)  # (K, V)
        logprobs = forward.scatter(gather_tokens(log_probs, forward.tokens))
        loss, metrics = F.policy_loss(logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, cfg.clip_eps)
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

    def ptx_batch(self) -> list[int]:
        """Indices of the next PPO-ptx batch: ``ptx_batch_size`` demonstrations drawn without replacement from this
        rank's generator, a fresh draw for each mini-batch."""
        count = min(self.cfg.ptx_batch_size, len(self.ptx_rows))
        return torch.randperm(len(self.ptx_rows), generator=self.ptx_generator)[:count].tolist()

    def ptx_loss(self) -> torch.Tensor:
        """Mean NLL per response token of the next batch of SFT demonstrations (PPO-ptx, untempered: it is the
        SFT objective)."""
        rows = [self.ptx_rows[i] for i in self.ptx_batch()]
        batch = collate_encoded(rows, self.tokenizer.pad_token_id).to(self.policy.device)
        forward = ResponseForward.of_tokens(batch, self.cfg.packing)
        return -forward.token_logprobs(self.policy).mean()

    # --- checkpoint / resume -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Save a checkpoint of the current ``iteration`` through the ``CheckpointStore`` (every rank calls this):
        the policy's and the critic's engines, the trainer's state (iteration, score moments, the collapse
        monitor's first metrics, history, kept samples, config and input fingerprint) and this rank's RNG states,
        the PPO-ptx generator's included."""
        state = {"iteration": self.iteration, "moments": self.moments.state_dict(), "first": self.monitor.first,
                 "history": self.history, "samples": self.kept_samples, "config": json_config(self.cfg),
                 "inputs": self.inputs}
        self.store.save(self.iteration, {"policy": self.policy, "critic": self.critic}, state,
                        {**rng_state(), "ptx": self.ptx_generator.get_state()})

    def resume(self, tag: str) -> None:
        """Continue from checkpoint ``tag``: the engines, the trainer's state and this rank's RNG states that
        ``save_checkpoint`` wrote.

        Raises:
            ValueError: The checkpoint was made with settings or inputs this run cannot continue
                (``checkpoint.resume_conflicts``; the message names them).
        """
        state = self.store.state(tag)
        conflicts = resume_conflicts(state, self.cfg, self.inputs)
        if conflicts:
            raise ValueError(f"{self.store.folder} holds an unfinished run that this one cannot continue; changed: "
                             f"{', '.join(conflicts)}. Resume with the same settings and inputs, or set checkpoint_dir "
                             "to a new folder")
        rng = self.store.load(tag, {"policy": self.policy, "critic": self.critic})
        self.iteration, self.history = state["iteration"], state["history"]
        self.monitor = CollapseMonitor(self.cfg, state["first"])
        self.kept_samples = state.get("samples", [])
        self.moments.load_state_dict(state["moments"])
        self.ptx_generator.set_state(rng.pop("ptx"))
        set_rng_state(rng)
        logger.info("Resumed from checkpoint %s", tag)

    # --- the models ------------------------------------------------------------------------------
    def trained_policy(self) -> torch.nn.Module:
        """The policy with whole weights (every rank must call this): under ZeRO-3 the whole copy; with LoRA
        the adapters merged into the base weights."""
        if self.cfg.policy_optim.zero_stage == 3:
            return self.rollout_policy().requires_grad_(True)
        return merge_adapters(self.policy.module)

    def rollout_policy(self) -> torch.nn.Module:
        """The model that generates: the policy, or under ZeRO-3 its whole copy refreshed (every rank calls this)."""
        if self.cfg.policy_optim.zero_stage != 3:
            return self.policy.module
        return self.generation_copy.refreshed(self.policy)
