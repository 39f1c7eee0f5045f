"""Nodes of the ablation pipeline: each grid row trains one variant per seed from the same SFT model and RM,
evaluates it against SFT on the held-out prompts, and the summary says which differences exceed seed noise."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import torch

from rlhf_pipeline.adapters import transformer_of
from rlhf_pipeline.config import config_from
from rlhf_pipeline.launch import LaunchConfig, run_ppo
from rlhf_pipeline.modeling import ModelBundle
from rlhf_pipeline.pipelines.ablation.report import CURVES, markdown, plot_curves, plot_gold, summary_table
from rlhf_pipeline.pipelines.evaluation.nodes import (
    EvalSet,
    compare_with_sft,
    sample_and_score,
)
from rlhf_pipeline.pipelines.ppo.nodes import score_prior
from rlhf_pipeline.pipelines.tracking import mlflow_logger, strict_json
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.stats import paired_bootstrap_win_rate
from rlhf_pipeline.task import gold_score
from rlhf_pipeline.training.engine import deep_merge

logger = logging.getLogger(__name__)



def evaluation_settings(evaluation: dict[str, Any], ablation: dict[str, Any]) -> dict[str, Any]:
    """``params:evaluation`` with the study's own overrides (``ablation.evaluation``, e.g. fewer prompts)."""
    return deep_merge(evaluation, ablation.get("evaluation") or {})


def sample_sft(eval_prompts: pd.DataFrame, sft_model: ModelBundle, reward_model: ModelBundle,
               evaluation: dict[str, Any], ablation: dict[str, Any]) -> dict[str, list]:
    """SFT's responses to the evaluation prompts and their gold and RM scores: every variant's baseline."""
    eval_set = EvalSet.of(eval_prompts, sft_model, evaluation_settings(evaluation, ablation))
    return strict_json(sample_and_score(sft_model.model, sft_model, reward_model, eval_set))


def variant_settings(variant: str, ppo: dict[str, Any], ablation: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The PPO parameters of a grid row: its preset (``ablation.base`` unless the row names ``preset``) with the
    row's overrides and the study's budget. Returns (PPO parameters, launcher, the row's overrides)."""
    overrides = dict(ablation["variants"][variant] or {})
    preset_name = overrides.pop("preset", ablation["base"])
    overrides.pop("trainer", None)
    if preset_name not in ppo:
        raise ValueError(f"ablation.variants.{variant}.preset: {preset_name!r} is not a preset of params:ppo; "
                         f"valid: {sorted(ppo)}")
    preset = {k: v for k, v in ppo[preset_name].items() if k not in ("name", "checkpoint_dir")}
    launcher = preset.pop("launcher", {})
    settings = deep_merge(preset, overrides)
    if ablation.get("iterations"):
        settings["iterations"] = ablation["iterations"]
    # every rollout is kept, so that the gold curve scores all of them
    settings.update(sample_every=1, sample_count=settings["rollout_batch_size"])
    return settings, launcher, {"preset": preset_name, **overrides}


def run_key(settings: dict[str, Any], evaluation: dict[str, Any], sft_scores: dict[str, list]) -> str:
    """What a finished run's result depends on, hashed: a stored result is reused only when this matches."""
    text = json.dumps([settings, evaluation, sft_scores["responses"]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gold_curve(samples: list[dict]) -> dict[int, float]:
    """Mean gold score of each iteration's kept rollouts (requests the task does not know are left out)."""
    frame = pd.DataFrame(samples)
    if frame.empty:
        return {}
    frame["gold"] = [gold_score(p, r) for p, r in zip(frame["prompt"], frame["response"], strict=True)]
    return frame.groupby("step")["gold"].mean().to_dict()


def seed_result(variant: str, seed: int, policy: torch.nn.Module, history: list[dict], gold: dict[int, float],
                sft_model: ModelBundle, reward_model: ModelBundle, eval_set: EvalSet, sft_scores: dict[str, list],
                ablation: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One trained policy's evaluation against SFT (with paired-bootstrap intervals of its win rates) and its
    training curves, as stored and as the summary reads them."""
    scores = sample_and_score(policy, sft_model, reward_model, eval_set)
    metrics = compare_with_sft(policy, scores, sft_scores, sft_model, eval_set)
    resamples, level = ablation["bootstrap_resamples"], ablation["level"]
    for scorer in ("gold", "rm"):
        _, low, high = paired_bootstrap_win_rate(scores[scorer], sft_scores[scorer], resamples, seed, level)
        metrics[f"win_rate_vs_sft_{scorer}_low"], metrics[f"win_rate_vs_sft_{scorer}_high"] = low, high
    curves = [{"step": row["step"], **{k: row.get(k) for k in CURVES if k != "gold_score"},
               "gold_score": gold.get(row["step"], math.nan)} for row in history]
    return strict_json({"variant": variant, "seed": seed, **extra, **metrics, "curves": curves})


def train_seeds(variant: str, ablation: dict[str, Any], settings: dict[str, Any], overrides: dict[str, Any],
                evaluation: dict[str, Any], sft_scores: dict[str, list], train) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``train(seed, work_dir, log) -> result`` for each seed, each in an MLflow run nested under the study's,
    reusing a stored result whose settings match (a killed study resumes with the run it was in). ``work_dir``
    (checkpoints, launcher job) is per settings: the trainer resumes a checkpoint only into the same ones."""
    results = []
    for seed in ablation["seeds"]:
        run_dir = Path(ablation["run_dir"]) / variant / f"seed_{seed}"
        stored, key = run_dir / "result.json", run_key({**settings, "seed": seed}, evaluation, sft_scores)
        earlier = json.loads(stored.read_text()) if stored.exists() else {}
        if earlier.get("key") == key:
            logger.info("Ablation %s seed %d: finished earlier, result read from %s", variant, seed, stored)
            results.append(earlier)
            continue
        logger.info("Ablation %s seed %d: training (%s)", variant, seed, overrides or "the preset as it is")
        with nested_run(f"{variant} seed {seed}", {"ablation.variant": variant, "ablation.seed": str(seed)},
                        {**overrides, "seed": seed}) as log:
            result = {**train(seed, run_dir / f"work_{key}", log), "key": key}
            log({k: v for k, v in result.items() if k not in ("curves", "variant", "seed")}, 0, "eval")
        run_dir.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(result, indent=1))
        results.append(result)
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curves", "key")} for r in results])
    curves = pd.DataFrame([{"variant": r["variant"], "seed": r["seed"], **c} for r in results for c in r["curves"]])
    return runs, curves


@contextmanager
def nested_run(name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[Callable[..., None]]:
    """An MLflow run nested under the active one (the study's, opened by kedro-mlflow), or none without one;
    yields ``log(metrics, step, prefix="ppo")`` into it."""
    run = mlflow.start_run(run_name=name, nested=True, tags=tags) if mlflow.active_run() is not None else None
    if run is not None:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in params.items()})

    def log(metrics: dict[str, Any], step: int, prefix: str = "ppo") -> None:
        mlflow_logger(prefix)(metrics, step)

    status = "FAILED"
    try:
        yield log
        status = "FINISHED"
    finally:
        if run is not None:
            mlflow.end_run(status)


def run_variant(sft_model: ModelBundle, reward_model: ModelBundle, ppo_prompts: pd.DataFrame, sft_train: pd.DataFrame,
                reward_model_metrics: dict[str, float], eval_prompts: pd.DataFrame, ablation_sft_scores: dict[str, list],
                ppo: dict[str, Any], evaluation: dict[str, Any], ablation: dict[str, Any], *,
                variant: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train one grid row with this project's PPO trainer for every seed and evaluate each policy against SFT.

    Args:
        sft_model, reward_model, ppo_prompts, sft_train, reward_model_metrics: as for the ppo pipeline.
        eval_prompts: Held-out prompts, sampled like the evaluation pipeline does.
        ablation_sft_scores: SFT's responses and scores on them (the paired baseline).
        ppo: The presets (``params:ppo``); the row overrides one of them.
        evaluation: Sampling settings of the evaluation (``params:evaluation``).
        ablation: The study (``params:ablation``): seeds, budget, rows, interval settings.
        variant: The grid row.

    Returns:
        One row per seed (evaluation metrics with bootstrap intervals) and the training curves per seed.
    """
    settings, launcher, overrides = variant_settings(variant, ppo, ablation)
    evaluation = evaluation_settings(evaluation, ablation)
    eval_set = EvalSet.of(eval_prompts, sft_model, evaluation)
    ptx = (sft_train["prompt"].tolist(), sft_train["response"].tolist())

    def train(seed: int, work_dir: Path, log) -> dict[str, Any]:
        cfg = PPOConfig.from_params({**settings, "seed": seed})
        launch = config_from(LaunchConfig, {**launcher, "job_dir": str(work_dir / "job")})
        result = run_ppo(sft_model, reward_model,
                         ppo_prompts["prompt"].tolist(), ptx, cfg, launch, checkpoint_dir=str(work_dir / "checkpoints"),
                         score_prior=score_prior(reward_model_metrics), log=log)
        return seed_result(variant, seed, result.policy, result.history, gold_curve(result.samples), sft_model,
                           reward_model, eval_set, ablation_sft_scores, ablation, stopped_early=result.stopped_early)

    return train_seeds(variant, ablation, settings, overrides, evaluation, ablation_sft_scores, train)


class TRLScoreModel(torch.nn.Module):
    """A value-head model in the shape TRL's ``get_reward`` reads: the backbone under ``base_model_prefix`` and a
    ``score`` head on its last hidden state."""

    base_model_prefix = "backbone"

    def __init__(self, value_model: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = transformer_of(value_model).base_model
        self.score = value_model.value_head


def trl_arguments(cfg: PPOConfig, output_dir: str, seed: int) -> dict[str, Any]:
    """TRL 0.28 ``PPOConfig`` arguments nearest to ours (the README lists what differs)."""
    return {"output_dir": output_dir, "per_device_train_batch_size": cfg.rollout_batch_size,
            "gradient_accumulation_steps": 1, "num_mini_batches": cfg.rollout_batch_size // cfg.mini_batch_size,
            "num_ppo_epochs": cfg.ppo_epochs, "response_length": cfg.sampling.max_new_tokens,
            "local_rollout_forward_batch_size": cfg.forward_batch_size or cfg.rollout_batch_size,
            "total_episodes": cfg.rollout_batch_size * cfg.iterations, "learning_rate": cfg.policy_optim.lr,
            "temperature": cfg.sampling.temperature, "kl_coef": cfg.kl_coef, "kl_estimator": cfg.kl_estimator,
            "cliprange": cfg.clip_eps, "cliprange_value": cfg.value_clip or 1e6, "gamma": cfg.gamma, "lam": cfg.lam,
            "max_grad_norm": cfg.policy_optim.grad_clip, "warmup_steps": cfg.policy_optim.warmup_ratio,  # below 1: a ratio
            "bf16": False, "report_to": "none", "save_strategy": "no", "num_sample_generations": 0,
            "logging_steps": 1, "seed": seed, "disable_tqdm": True, "stop_token": "eos"}


def run_trl_variant(sft_model: ModelBundle, reward_model: ModelBundle, ppo_prompts: pd.DataFrame,
                    sft_train: pd.DataFrame, reward_model_metrics: dict[str, float], eval_prompts: pd.DataFrame,
                    ablation_sft_scores: dict[str, list], ppo: dict[str, Any], evaluation: dict[str, Any],
                    ablation: dict[str, Any], *, variant: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """TRL 0.28's ``PPOTrainer`` as a grid row (``trainer: trl``; install the ``[bench]`` extra): trained from the
    same SFT policy and RM on the same prompts and number of sampled responses as the preset, and evaluated
    like every other row. Arguments and returns as ``run_variant``'s (``sft_train``, the RM statistics and the
    launcher go unused: TRL has no PPO-ptx and no score normalisation)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer as TRLTrainer

    settings, _, overrides = variant_settings(variant, ppo, ablation)
    evaluation = evaluation_settings(evaluation, ablation)
    eval_set = EvalSet.of(eval_prompts, sft_model, evaluation)
    encoder = sft_model.encoder()
    tokenizer = copy.deepcopy(sft_model.tokenizer)
    tokenizer.padding_side = "left"

    def train(seed: int, work_dir: Path, log) -> dict[str, Any]:
        cfg = PPOConfig.from_params({**settings, "seed": seed})
        queries = Dataset.from_dict({"input_ids": [
            encoder.sampling_prompt(p, cfg.max_prompt_length, cfg.sampling.max_new_tokens)
            for p in ppo_prompts["prompt"]]})
        torch.manual_seed(seed)
        policy = copy.deepcopy(sft_model.model)
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = TRLTrainer(args=TRLConfig(**trl_arguments(cfg, output_dir, seed)), processing_class=tokenizer,
                                 model=policy, ref_model=copy.deepcopy(sft_model.model),
                                 reward_model=TRLScoreModel(copy.deepcopy(reward_model.model)),
                                 value_model=TRLScoreModel(copy.deepcopy(reward_model.model)), train_dataset=queries)
            trainer.remove_callback(PrinterCallback)  # its metrics go to MLflow below, not as dicts on stdout
            trainer.train()
        history = [{"step": i + 1, "reward/raw_score": entry["objective/scores"], "kl/sequence": entry["objective/kl"]}
                   for i, entry in enumerate(e for e in trainer.state.log_history if "objective/scores" in e)]
        for row in history:
            log({k: v for k, v in row.items() if k != "step"}, row["step"])
        return seed_result(variant, seed, policy.eval(), history, {}, sft_model, reward_model, eval_set,
                           ablation_sft_scores, ablation, stopped_early=False)

    return train_seeds(variant, ablation, settings, overrides, evaluation, ablation_sft_scores, train)


def summarise_ablation(ablation: dict[str, Any], ablation_sft_scores: dict[str, list], **outputs: pd.DataFrame,
                       ) -> tuple[pd.DataFrame, str, plt.Figure, plt.Figure]:
    """The study's table (mean and interval per variant and metric, differences from PPO-max and whether they
    exceed their interval), the same as Markdown, the training curves and the final gold scores.

    Args:
        ablation: ``base`` (the reference row) and ``level`` (of the intervals).
        ablation_sft_scores: SFT's scores, drawn as the baseline line.
        **outputs: ``<variant>_runs`` and ``<variant>_curves`` of every grid row.
    """
    runs = pd.concat([v for k, v in outputs.items() if k.endswith("_runs")], ignore_index=True)
    curves = pd.concat([v for k, v in outputs.items() if k.endswith("_curves")], ignore_index=True)
    reference, level = ablation["base"], ablation["level"]
    summary = summary_table(runs, reference, level)
    gold = [g for g in ablation_sft_scores["gold"] if g is not None]
    sft_gold = sum(gold) / len(gold) if gold else None
    for _, row in summary.iterrows():
        logger.info("Ablation %s (%d seeds): gold %s, gold win vs SFT %s, KL %.3f", row["variant"], row["seeds"],
                    row["gold_score"], row["win_rate_vs_sft_gold"], row["kl_to_sft"])
    return summary, markdown(summary, reference, level), plot_curves(curves), plot_gold(summary, runs, sft_gold)
