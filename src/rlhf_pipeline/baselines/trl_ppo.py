"""TRL 0.28's ``PPOTrainer`` (``trl.experimental.ppo``; the ``[bench]`` extra) behind ``launch.run_ppo``'s signature:
the baseline row of the studies, trained from the same SFT policy and RM on the same prompts and number
of sampled responses as this project's PPO."""

from __future__ import annotations

import copy
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from rlhf_pipeline.adapters import transformer_of
from rlhf_pipeline.modeling import ModelBundle
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.trainer import PPOResult
from rlhf_pipeline.training.engine import LogFn, no_logging

if TYPE_CHECKING:  # launch.stages imports this module: its trainer registry names run_trl_ppo
    from rlhf_pipeline.launch.job import LaunchConfig


class TRLScoreModel(torch.nn.Module):
    """A value-head model in the shape TRL's ``get_reward`` reads: the backbone under ``base_model_prefix`` and a
    ``score`` head on its last hidden state."""

    base_model_prefix = "backbone"

    def __init__(self, value_model: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = transformer_of(value_model).base_model
        self.score = value_model.value_head


def trl_arguments(cfg: PPOConfig, output_dir: str) -> dict[str, Any]:
    """TRL 0.28 ``PPOConfig`` arguments nearest to ``cfg``: the same buffer, mini-batches, epochs, response length,
    learning rate, temperature, KL coefficient and estimator, clip ranges, GAE and seed."""
    return {"output_dir": output_dir, "per_device_train_batch_size": cfg.rollout_batch_size,
            "gradient_accumulation_steps": 1, "num_mini_batches": cfg.rollout_batch_size // cfg.mini_batch_size,
            "num_ppo_epochs": cfg.ppo_epochs, "response_length": cfg.sampling.max_new_tokens,
            "local_rollout_forward_batch_size": cfg.forward_batch_size or cfg.rollout_batch_size,
            "total_episodes": cfg.rollout_batch_size * cfg.iterations, "learning_rate": cfg.policy_optim.lr,
            "temperature": cfg.sampling.temperature, "kl_coef": cfg.kl_coef, "kl_estimator": cfg.kl_estimator,
            "cliprange": cfg.clip_eps, "cliprange_value": cfg.value_clip or 1e6, "gamma": cfg.gamma, "lam": cfg.lam,
            "max_grad_norm": cfg.policy_optim.grad_clip, "warmup_steps": cfg.policy_optim.warmup_ratio,  # below 1: a ratio
            "bf16": False, "report_to": "none", "save_strategy": "no", "num_sample_generations": 0,
            "logging_steps": 1, "seed": cfg.seed, "disable_tqdm": True, "stop_token": "eos"}


def run_trl_ppo(policy: ModelBundle, reward_model: ModelBundle, prompts: list[str],
                ptx_data: tuple[list[str], list[str]], cfg: PPOConfig, launch: LaunchConfig,
                checkpoint_dir: str | None = None, score_prior: tuple[float, float, float] | None = None,
                log: LogFn = no_logging) -> PPOResult:
    """Train a copy of ``policy`` with TRL's PPO; arguments as ``launch.run_ppo``'s. TRL has no PPO-ptx, score
    normalisation or resumable checkpoints, so ``ptx_data``, ``score_prior`` and ``checkpoint_dir`` go unused, and
    it trains in this process (``PPOSettings`` refuses a ``trl`` run on more processes).

    Returns:
        The trained policy and per-iteration ``reward/raw_score`` and ``kl/sequence`` (also sent to ``log``); no
            samples.

    Raises:
        ImportError: TRL is not installed (``pip install -e ".[bench]"``).
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer as TRLTrainer

    encoder = policy.encoder()
    tokenizer = copy.deepcopy(policy.tokenizer)
    tokenizer.padding_side = "left"
    queries = Dataset.from_dict({"input_ids": [
        encoder.sampling_prompt(p, cfg.max_prompt_length, cfg.sampling.max_new_tokens) for p in prompts]})
    torch.manual_seed(cfg.seed)
    trained = copy.deepcopy(policy.model)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = TRLTrainer(args=TRLConfig(**trl_arguments(cfg, output_dir)), processing_class=tokenizer,
                             model=trained, ref_model=copy.deepcopy(policy.model),
                             reward_model=TRLScoreModel(copy.deepcopy(reward_model.model)),
                             value_model=TRLScoreModel(copy.deepcopy(reward_model.model)), train_dataset=queries)
        trainer.remove_callback(PrinterCallback)  # its metrics go to ``log``, not as dicts on stdout
        trainer.train()
    history = [{"step": i + 1, "reward/raw_score": entry["objective/scores"], "kl/sequence": entry["objective/kl"]}
               for i, entry in enumerate(e for e in trainer.state.log_history if "objective/scores" in e)]
    for row in history:
        log({k: v for k, v in row.items() if k != "step"}, row["step"])
    return PPOResult(trained.eval(), history, [], stopped_early=False)
