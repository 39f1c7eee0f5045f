"""The four PPO models - policy, reference, critic, reward model - built and placed in one place.

``build_models`` turns a policy and a reward model held in memory (plus, optionally, a reference and critic
loaded by ``load_models``) into the models the trainer runs: with LoRA the reference is the policy with its
adapters off and a critic from the reward model shares the reward model's base weights; without LoRA the
reference is a copy of the policy and the critic a copy of the reward model (or the policy under a new value
head). ``load_models`` reads them from a job folder as each engine will hold them (ZeRO-3 models
partitioned from the first byte). ``fingerprint`` summarises the inputs a run depends on, so that a checkpoint
is resumed only against the same SFT model, reward model, tokenizer, prompts and world size.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_pipeline.adapters import AdaptersOff, add_lora
from rlhf_pipeline.config import digest
from rlhf_pipeline.modeling import ModelBundle, ValueHeadModel, disable_dropout, load_policy, use_fused_gelu
from rlhf_pipeline.rl.config import PPOConfig, critic_steps, engine_optims, policy_steps
from rlhf_pipeline.training.devices import to_rank_device
from rlhf_pipeline.training.engine import (
    bf16_enabled,
    deepspeed_config,
    frozen_ds_config,
    load_whole_weights,
    make_engine,
    make_frozen_engine,
    partitioned_loading,
    world,
)


@dataclass
class PPOModels:
    """The models of one run: as ``build_models`` makes them, or as the run trains them (``make_engines``:
    DeepSpeed engines for the policy and the critic, the frozen models placed on this rank)."""

    policy: torch.nn.Module
    reference: torch.nn.Module | AdaptersOff
    critic: ValueHeadModel
    reward_model: ValueHeadModel | AdaptersOff


def build_models(policy, reward_model: ValueHeadModel, cfg: PPOConfig, reference=None,
                 critic: ValueHeadModel | None = None) -> PPOModels:
    """The run's four models from a policy and a reward model that the run owns (it trains, moves and casts
    them; a caller that keeps using its models passes copies). Dropout is switched off (old and new
    log-probs must come from one function) and GPT-2's GELU runs as one fused kernel.

    Raises:
        ValueError: ``reference`` or ``critic`` given with LoRA (both derive from the policy and RM then).
        TypeError: LoRA with ``critic_from_reward_model`` and a reward model that is not a ``ValueHeadModel``.
    """
    for model in (policy, reward_model, reference, critic):
        if model is not None:
            disable_dropout(model)
            use_fused_gelu(model)
    if not cfg.lora.enabled:
        if reference is None:
            reference = copy.deepcopy(policy)
        if critic is None:
            critic = copy.deepcopy(reward_model) if cfg.critic_from_reward_model else \
                ValueHeadModel(copy.deepcopy(policy), seed=cfg.seed)
        critic.requires_grad_(True)
        return PPOModels(policy, reference, critic.freeze_unused_lm_head(), reward_model)
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
    return PPOModels(policy, AdaptersOff(policy), critic.freeze_unused_lm_head(), reward_model)


def make_engines(models: PPOModels, cfg: PPOConfig) -> PPOModels:
    """Wrap the policy and the critic in DeepSpeed engines (their schedules over the steps each takes) and place
    the frozen models on this rank's device in the policy's precision: whole, partitioned or offloaded by
    ZeRO-3 (``frozen_models``). With LoRA the reference and a reward model sharing the critic's base weights
    are views whose weights the engines placed (only the reward model's own head is moved here)."""
    policy_optim, critic_optim = engine_optims(cfg)
    policy = make_engine(models.policy, policy_optim, policy_steps(cfg))
    critic = make_engine(models.critic, critic_optim, critic_steps(cfg))
    bf16 = policy.bfloat16_enabled()
    reference = models.reference if cfg.lora.enabled else make_frozen_engine(models.reference, cfg.frozen_models, bf16)
    if isinstance(models.reward_model, AdaptersOff):
        models.reward_model.model.value_head.to(critic.device)
        reward_model = models.reward_model
    else:
        reward_model = make_frozen_engine(models.reward_model, cfg.frozen_models, bf16)
    return PPOModels(policy, reference, critic, reward_model)


def load_configs(cfg: PPOConfig) -> dict[str, dict | None]:
    """The DeepSpeed config that each model (``policy``, ``critic``, ``frozen``: the reference and the reward
    model) is loaded under with ``partitioned_loading``: ranks then hold only their partition of a ZeRO-3 model
    from the moment it is read."""
    policy_optim, critic_optim = engine_optims(cfg)
    return {"policy": deepspeed_config(policy_optim), "critic": deepspeed_config(critic_optim),
            "frozen": frozen_ds_config(cfg.frozen_models, bf16_enabled(cfg.policy_optim.bf16))}


def load_models(job: Path, cfg: PPOConfig) -> tuple[ModelBundle, dict[str, torch.nn.Module]]:
    """The policy bundle and the keyword models of ``build_models`` (``reward_model``, and without LoRA
    ``reference`` and ``critic``), read from a job folder's ``policy`` and ``reward_model`` directories as each
    engine will hold them: a ZeRO-3 model partitioned from the first byte, so no rank holds it whole in host
    memory; a whole model in its training precision and moved to the rank's device at once, so the host holds
    one at a time. The reference and the critic are read again rather than copied from a policy and reward
    model this rank may hold only a part of."""
    configs = load_configs(cfg)
    # a bf16 run reads bf16 weights (its engines would cast them anyway): half the host memory of fp32
    policy_dtype, critic_dtype = ("bfloat16" if bf16_enabled(optim.bf16) else None
                                  for optim in (cfg.policy_optim, cfg.critic_optim))

    def placed(model: torch.nn.Module) -> torch.nn.Module:
        return model if hasattr(next(model.parameters()), "ds_id") else to_rank_device(model)

    if cfg.lora.enabled:  # LoRA trains at ZeRO 0-2 and derives the reference and critic from the policy and RM
        policy = load_policy(str(job / "policy"), dtype=policy_dtype)
        reward_model = ValueHeadModel.from_pretrained(str(job / "reward_model"), dtype=critic_dtype)
        return policy.with_model(placed(policy.model)), {"reward_model": placed(reward_model)}
    with partitioned_loading(configs["policy"]):
        policy = load_policy(str(job / "policy"), dtype=policy_dtype)
    policy = policy.with_model(placed(policy.model))
    models = {}
    with partitioned_loading(configs["frozen"]):  # the frozen models take the policy's precision
        models["reward_model"] = placed(ValueHeadModel.from_pretrained(str(job / "reward_model"), dtype=policy_dtype))
        models["reference"] = placed(load_policy(str(job / "policy"), dtype=policy_dtype).model)
    with partitioned_loading(configs["critic"]):
        models["critic"] = placed(
            ValueHeadModel.from_pretrained(str(job / "reward_model"), dtype=critic_dtype) if cfg.critic_from_reward_model
            else ValueHeadModel(load_policy(str(job / "policy"), dtype=critic_dtype).model, seed=cfg.seed))
    return policy, models


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a model's weights: the float64 sum and sum of squares of each parameter (a ZeRO-3
    parameter's over every rank's flat partition, ``ds_tensor``, whose padding adds zeros), printed to 12
    significant digits so that summation order does not show. The same model in another precision has
    another digest."""
    stats = []
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        total, squares = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for chunk in getattr(param, "ds_tensor", param).detach().flatten().split(1 << 24):  # float64 in slices
            chunk = chunk.double()
            total, squares = total + chunk.sum().cpu(), squares + chunk.square().sum().cpu()
        stats.append(torch.stack([total, squares]))
    total = torch.stack(stats) if stats else torch.zeros(0, 2, dtype=torch.float64)
    partitioned = [hasattr(param, "ds_tensor") for _, param in sorted(model.named_parameters(), key=lambda i: i[0])]
    if world()[1] > 1 and any(partitioned):  # whole parameters are the same on every rank: only partitions add up
        device = next(model.parameters()).device
        mask = torch.tensor(partitioned, device=device).unsqueeze(1)
        total = total.to(device)
        summed = total * mask
        torch.distributed.all_reduce(summed)
        total = torch.where(mask, summed, total)
    text = ",".join(f"{value:.12g}" for value in total.flatten().tolist())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(policy, reward_model, tokenizer, prompt_ids: list[list[int]]) -> dict[str, str | int]:
    """What a PPO run's updates depend on besides its settings: the SFT policy's and the reward model's weights,
    the tokenizer's vocabulary, the fitted prompts and the number of ranks (each rolls out its own share)."""
    return {"sft_policy": weights_fingerprint(policy), "reward_model": weights_fingerprint(reward_model),
            "tokenizer": digest(tokenizer.get_vocab()), "prompts": digest(prompt_ids), "world_size": world()[1]}


class GenerationCopy:
    """A whole copy of a ZeRO-3 policy that generates, refreshed once per rollout: generating from the partitioned
    engine would all-gather every layer for every new token, and ranks whose rows hit EOS at different steps
    would wait for each other in those all-gathers. The copy is built on the device from the policy's config,
    never as a whole copy in host memory."""

    def __init__(self):
        self.model: torch.nn.Module | None = None

    def refreshed(self, engine) -> torch.nn.Module:
        """The copy with the engine's current weights (every rank calls this: each parameter is gathered)."""
        if self.model is None:
            partitioned, device = engine.module, torch.device(engine.device)
            # its random initialisation, overwritten below, must not move the sampling RNG
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
                self.model = type(partitioned)._from_config(
                    partitioned.config, dtype=torch.bfloat16 if engine.bfloat16_enabled() else None)
            self.model.generation_config = copy.deepcopy(partitioned.generation_config)  # e.g. its EOS ids
            self.model.eval().requires_grad_(False)
        load_whole_weights(engine, self.model)
        return self.model
