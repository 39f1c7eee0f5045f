"""Nodes of the sft pipeline (the core is imported inside them: building the pipelines imports no torch)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.data import prompt_bucket
from rlhf_pipeline.pipelines.tracking import mlflow_logger
from rlhf_pipeline.reporting import nan_mean, strict_json
from rlhf_pipeline.task import gold_score

if TYPE_CHECKING:
    from rlhf_pipeline.modeling import ModelBundle

logger = logging.getLogger(__name__)


def prepare_base_model(sft_train: pd.DataFrame, rm_train: pd.DataFrame, model: dict[str, Any]) -> ModelBundle:
    """The model SFT starts from.

    Args:
        sft_train: Demonstrations (their text trains the tiny tokenizer).
        rm_train: Preference pairs (their text too).
        model: ``name_or_path`` (``tiny``, a local directory or a hub id), or ``gguf`` (``package`` and ``file``
            of a GGUF file shipped in an installed Python package), ``prompt_format`` (``hh`` or
            ``chat_template``), ``trust_remote_code``, ``dtype`` and the ``tiny`` model's shape.

    Returns:
        The tiny model with a BPE tokenizer trained on the corpus, or the loaded (de-quantised) causal LM,
        with the prompt format every later stage uses.
    """
    from rlhf_pipeline.modeling import (
        ModelBundle,
        TinyModelConfig,
        build_tiny_model,
        load_gguf,
        load_policy,
        train_tokenizer,
    )

    prompt_format = model.get("prompt_format", "hh")
    if model.get("gguf"):
        return load_gguf(model["gguf"]["package"], model["gguf"]["file"], prompt_format, model.get("dtype"))
    if model["name_or_path"] != "tiny":
        return load_policy(model["name_or_path"], model.get("trust_remote_code", False), model.get("dtype"), prompt_format)
    tiny = TinyModelConfig(**model.get("tiny", {}))
    corpus = pd.concat([sft_train["prompt"] + " " + sft_train["response"], rm_train["prompt"] + " " + rm_train["chosen"],
                        rm_train["prompt"] + " " + rm_train["rejected"]])
    tokenizer = train_tokenizer(corpus.tolist(), tiny.vocab_size)
    bundle = ModelBundle(build_tiny_model(tokenizer, tiny), tokenizer, prompt_format)
    bundle.encoder()  # fail here, not stages later, on a prompt format the tokenizer cannot serve
    return bundle


def held_out_mask(prompts: pd.Series, fraction: float, seed: int) -> pd.Series:
    """True for the prompts of the held-out validation slice (chosen by prompt, never by row)."""
    return prompts.map(lambda p: prompt_bucket(p, seed + 1) < fraction)


def train_sft_model(base_model: ModelBundle, sft_train: pd.DataFrame, sft: dict[str, Any],
                    launcher: dict[str, Any]) -> tuple[ModelBundle, dict]:
    """Fine-tune the base model on the demonstrations and measure it on held-out prompts.

    Args:
        base_model: Model and tokenizer from ``prepare_base_model``.
        sft_train: ``prompt``, ``response`` demonstrations.
        sft: ``SFTConfig`` fields plus ``val_fraction``, ``sampling``, ``gold_eval_prompts`` and ``launcher``
            (keys over ``launcher``). ``epochs: 0`` trains nothing: the base model (an instruction-tuned model)
            is the SFT model, its samples still measured.
        launcher: The run's ``LaunchConfig`` keys and ``work_dir``: more than one process trains through the
            ``deepspeed`` launcher.

    Returns:
        The SFT model and its metrics: held-out loss/perplexity, the demonstrations dropped or truncated to
        fit the context, and the mean gold score of sampled responses before and after training (``null``
        without a gold reward).
    """
    from rlhf_pipeline.generation import fit_prompts, generate_texts
    from rlhf_pipeline.launch import SFTSettings, run_sft
    from rlhf_pipeline.training.devices import to_rank_device

    settings = SFTSettings.from_params(sft, launcher)
    cfg, launch = settings.train, settings.launch
    val_fraction, gold_prompts = settings.val_fraction, settings.gold_eval_prompts
    held_out = held_out_mask(sft_train["prompt"], val_fraction, cfg.seed)
    train, val = sft_train[~held_out], sft_train[held_out]
    encoder = base_model.encoder()
    sampling = encoder.sampling(settings.sampling)
    eval_prompts = val["prompt"].drop_duplicates().head(gold_prompts).tolist()
    kept, eval_prompt_ids = fit_prompts(encoder, eval_prompts, max(cfg.max_length - sampling.max_new_tokens, 1),
                                        sampling.max_new_tokens)
    log = mlflow_logger("sft")

    def gold_of_samples(model) -> float | None:
        responses = generate_texts(to_rank_device(model), base_model.tokenizer, eval_prompt_ids, sampling, seed=cfg.seed)
        return nan_mean(gold_score(eval_prompts[i], r) for i, r in zip(kept, responses, strict=True))

    gold_before = gold_of_samples(base_model.model)
    trained = cfg.epochs > 0  # in one process the trained model may be the base model's own object
    model, train_metrics = run_sft(base_model, (train["prompt"].tolist(), train["response"].tolist()),
                                   (val["prompt"].tolist(), val["response"].tolist()), cfg, launch, log)
    gold_after = gold_of_samples(model) if trained else gold_before
    metrics = {**{k.replace("/", "_"): v for k, v in train_metrics.items()}, "gold_score_before": gold_before,
               "gold_score_after": gold_after, "train_examples": len(train), "val_examples": len(val),
               "gold_eval_prompts_dropped": len(eval_prompts) - len(kept)}
    logger.info("SFT: val loss %s, gold score of samples %s -> %s", metrics.get("val_loss"), gold_before,
                metrics["gold_score_after"])
    return (base_model.with_model(model) if trained else base_model), strict_json(metrics)
