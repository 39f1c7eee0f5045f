"""Nodes of the sft pipeline."""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from rlhf_pipeline.config import config_from
from rlhf_pipeline.data import prompt_bucket
from rlhf_pipeline.generation import SamplingConfig, generate_texts
from rlhf_pipeline.modeling import (
    ModelBundle,
    TinyModelConfig,
    build_tiny_model,
    load_policy,
    train_tokenizer,
)
from rlhf_pipeline.pipelines.tracking import mlflow_logger
from rlhf_pipeline.task import gold_score
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.sft import SFTConfig, train_sft

logger = logging.getLogger(__name__)


def prepare_base_model(sft_train: pd.DataFrame, rm_train: pd.DataFrame, model: dict[str, Any]) -> ModelBundle:
    """The model SFT starts from.

    Args:
        sft_train: Demonstrations (their text trains the tiny tokenizer).
        rm_train: Preference pairs (their text too).
        model: ``name_or_path`` (``tiny``, a local directory or a hub id), ``trust_remote_code``, ``dtype``
            and the ``tiny`` model's shape.

    Returns:
        The tiny model with a BPE tokenizer trained on the corpus, or the loaded Hugging Face causal LM.
    """
    if model["name_or_path"] != "tiny":
        return load_policy(model["name_or_path"], model.get("trust_remote_code", False), model.get("dtype"))
    tiny = TinyModelConfig(**model.get("tiny", {}))
    corpus = pd.concat([sft_train["prompt"] + " " + sft_train["response"], rm_train["prompt"] + " " + rm_train["chosen"],
                        rm_train["prompt"] + " " + rm_train["rejected"]])
    tokenizer = train_tokenizer(corpus.tolist(), tiny.vocab_size)
    return ModelBundle(build_tiny_model(tokenizer, tiny), tokenizer)


def held_out_mask(prompts: pd.Series, fraction: float, seed: int) -> pd.Series:
    """True for the prompts of the held-out validation slice (chosen by prompt, never by row)."""
    return prompts.map(lambda p: prompt_bucket(p, seed + 1) < fraction)


def mean_gold_score(prompts: list[str], responses: list[str]) -> float:
    """Mean gold reward, ``nan`` when the prompts are not of the embedded task."""
    scores = [s for s in (gold_score(p, r) for p, r in zip(prompts, responses, strict=True)) if not math.isnan(s)]
    return sum(scores) / len(scores) if scores else math.nan


def train_sft_model(base_model: ModelBundle, sft_train: pd.DataFrame, sft: dict[str, Any]) -> tuple[ModelBundle, dict]:
    """Fine-tune the base model on the demonstrations and measure it on held-out prompts.

    Args:
        base_model: Model and tokenizer from ``prepare_base_model``.
        sft_train: ``prompt``, ``response`` demonstrations.
        sft: ``SFTConfig`` fields plus ``val_fraction``, ``sampling`` and ``gold_eval_prompts``.

    Returns:
        The SFT model and its metrics: held-out loss/perplexity and the mean gold score of sampled
        responses before and after training.
    """
    params = dict(sft)
    val_fraction, gold_prompts = params.pop("val_fraction"), params.pop("gold_eval_prompts")
    sampling = config_from(SamplingConfig, params.pop("sampling"))
    cfg = config_from(SFTConfig, params, optim=OptimConfig)
    held_out = held_out_mask(sft_train["prompt"], val_fraction, cfg.seed)
    train, val = sft_train[~held_out], sft_train[held_out]
    eval_prompts = val["prompt"].drop_duplicates().head(gold_prompts).tolist()
    log = mlflow_logger("sft")

    def gold_of_samples(model) -> float:
        return mean_gold_score(eval_prompts, generate_texts(model, base_model.tokenizer, eval_prompts, sampling, seed=cfg.seed))

    gold_before = gold_of_samples(base_model.model)
    model, val_metrics = train_sft(base_model.model, base_model.tokenizer, train["prompt"].tolist(), train["response"].tolist(),
                                   val["prompt"].tolist(), val["response"].tolist(), cfg, log)
    metrics = {**{k.replace("/", "_"): v for k, v in val_metrics.items()}, "gold_score_before": gold_before,
               "gold_score_after": gold_of_samples(model), "train_examples": len(train), "val_examples": len(val)}
    logger.info("SFT: val loss %.3f, gold score of samples %.3f -> %.3f", metrics.get("val_loss", math.nan),
                gold_before, metrics["gold_score_after"])
    log({k: v for k, v in metrics.items() if isinstance(v, float) and not math.isnan(v)}, 0)
    return ModelBundle(model, base_model.tokenizer), metrics
