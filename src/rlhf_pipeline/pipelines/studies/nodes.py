"""Nodes of a study (``settings.STUDIES``: the ablation, the long run, the tuning grid) around the ppo and evaluation
pipelines' own nodes: a grid row's settings (a PPO preset with the row's overrides), its stored result, and the
study's summary. The core is imported inside them: building the pipelines imports no torch."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.config import digest
from rlhf_pipeline.pipelines.tracking import as_metrics

if TYPE_CHECKING:
    from rlhf_pipeline.evaluation import EvalSet
    from rlhf_pipeline.launch import PPOSettings
    from rlhf_pipeline.modeling import ModelBundle

logger = logging.getLogger(__name__)
KEYS = {"base", "iterations", "level", "bootstrap_resamples", "evaluation", "window", "rows"}


def check_study(parameters: dict[str, Any], study: str, rows: list[str] | None = None,
                evaluation: dict[str, Any] | None = None) -> None:
    """Raise ``ValueError`` naming an unknown key of ``params:<study>`` (or of its ``evaluation`` overrides, against
    ``evaluation``'s keys), a ``window`` or ``level`` outside (0, 1], fewer than one bootstrap resample, a row of
    ``rows`` that ``<study>.rows`` does not define, or, when ``rows`` are all that ``settings.STUDIES`` declares,
    a defined row missing from them (it would never run) or a ``base`` that is not one of them."""
    if unknown := set(parameters) - KEYS:
        raise ValueError(f"{study}: unknown key(s) {sorted(unknown)}; valid: {sorted(KEYS)} (the rows and seeds are "
                         f"declared in settings.py: STUDIES['{study}'])")
    if evaluation is not None and (unknown := set(parameters.get("evaluation") or {}) - set(evaluation)):
        raise ValueError(f"{study}.evaluation: unknown key(s) {sorted(unknown)}; valid: the keys of params:evaluation "
                         f"{sorted(evaluation)}")
    for key in ("window", "level"):
        if not 0 < parameters[key] <= 1:
            raise ValueError(f"{study}.{key} must be in (0, 1], got {parameters[key]}")
    if parameters["bootstrap_resamples"] < 1:
        raise ValueError(f"{study}.bootstrap_resamples must be >= 1, got {parameters['bootstrap_resamples']}")
    defined = set(parameters["rows"])
    if missing := [row for row in rows or [] if row not in defined]:
        raise ValueError(f"{study}.rows: no row {', '.join(map(repr, missing))} (declared in settings.py); defined: "
                         f"{sorted(defined)}")
    if rows and (unused := sorted(defined - set(rows))):
        raise ValueError(f"{study}.rows: {unused} not declared in settings.py (STUDIES['{study}']), so never run; "
                         "declare them there or remove them")
    if rows and parameters["base"] not in rows:
        raise ValueError(f"{study}.base: {parameters['base']!r} must be one of the study's rows (the reference every "
                         f"difference is taken from, and the preset the others start from): {rows}")


def row_parameters(ppo: dict[str, Any], parameters: dict[str, Any], study: str, row: str, seed: int) -> dict[str, Any]:
    """A grid row's PPO parameters: its preset (``<study>.base`` unless the row names ``preset``) with the row's
    overrides (``<study>.rows.<row>``), the study's budget (``iterations``), every rollout kept for the gold
    and judge curves, and ``seed``. Raises ``ValueError`` naming an unknown study key, row or preset."""
    from rlhf_pipeline.rl.config import PPOConfig
    from rlhf_pipeline.training.engine import deep_merge

    check_study(parameters, study)
    if row not in parameters["rows"]:
        raise ValueError(f"{study}.rows: no row {row!r} (declared in settings.py); defined: {sorted(parameters['rows'])}")
    overrides = dict(parameters["rows"][row] or {})
    preset = overrides.pop("preset", parameters["base"])
    if preset not in ppo:
        raise ValueError(f"{study}.rows.{row}.preset: {preset!r} is not a preset of params:ppo; valid: {sorted(ppo)}")
    params = deep_merge(ppo[preset], overrides)
    if parameters.get("iterations"):
        params["iterations"] = parameters["iterations"]
    return {**params, "seed": seed, "sample_every": 1, "sample_count": params.get("rollout_batch_size", PPOConfig.rollout_batch_size)}


def row_settings(ppo: dict[str, Any], parameters: dict[str, Any], launcher: dict[str, Any], previous: Any = None, *,
                 study: str, row: str, seed: int) -> PPOSettings:
    """The (row, seed)'s typed settings, named ``<study>/<row>/seed_<seed>`` in metrics; its work folders
    (checkpoints, job) are ``<work_dir>/<study>/<row>/seed_<seed>/<hash of its parameters>``, so a resumed run
    only resumes into the same settings. ``previous`` (the stored result of the (row, seed) before it, ``None``
    when not stored) goes unused: as an input it makes the study run one (row, seed) to its stored result before
    the next trains, so one policy is in memory at a time and a killed study keeps every result it finished."""
    from rlhf_pipeline.launch import PPOSettings

    params = row_parameters(ppo, parameters, study, row, seed)
    return PPOSettings.from_params(params, launcher, f"{study}/{row}/seed_{seed}",
                                   folder=f"{study}/{row}/seed_{seed}/{digest(params)}")


def settings_key(settings: PPOSettings, sft_scores: dict[str, list], evaluation: dict[str, Any],
                 parameters: dict[str, Any]) -> str:
    """What a (row, seed)'s result depends on, hashed: its trainer and PPO settings, SFT's samples (the SFT model,
    RM and prompts), the study's evaluation and its interval settings."""
    return digest([settings.trainer, asdict(settings.train), sft_scores, evaluation, parameters.get("evaluation"),
                   parameters["bootstrap_resamples"], parameters["level"]])


def row_result(settings: PPOSettings, history: pd.DataFrame, samples: list[dict], scores: dict[str, list],
               metrics: dict[str, Any], sft_scores: dict[str, list], judge_model: ModelBundle, eval_set: EvalSet,
               evaluation: dict[str, Any], parameters: dict[str, Any], *, study: str, row: str,
               seed: int) -> dict[str, Any]:
    """One (row, seed)'s stored result: ``evaluation.seed_result`` of its training and evaluation (intervals by
    ``<study>.bootstrap_resamples`` and ``level``; the judge scores every kept rollout, cut to the evaluation's
    ``max_length``), with ``study``, ``variant``, ``seed``, ``stopped_early`` and ``key``."""
    from rlhf_pipeline.evaluation import seed_result

    result = seed_result(history, samples, scores, sft_scores, metrics, parameters["bootstrap_resamples"], seed,
                         parameters["level"], judge_model, eval_set.max_length)
    return {"study": study, "variant": row, "seed": seed, "key": settings_key(settings, sft_scores, evaluation, parameters),
            "stopped_early": bool(len(history) < settings.train.iterations), **result}


def summarise_study(parameters: dict[str, Any], evaluation: dict[str, Any], sft_scores: dict[str, list],
                    sft_metrics: dict[str, Any], ppo: dict[str, Any], launcher: dict[str, Any], *, study: str,
                    **results: dict[str, Any] | None) -> dict[str, Any]:
    """A study's tables and figures from every stored (row, seed).

    Args:
        parameters, evaluation: The study's parameters (``base``, ``level``, ``window``) and the evaluation's.
        sft_scores, sft_metrics: SFT's samples and its own evaluation on the study's prompts.
        ppo, launcher: The presets and the run's launcher, which each stored result's settings are checked against.
        study: Its name (``settings.STUDIES``).
        **results: ``result__<row>__seed_<seed>`` of every (row, seed) (``None``: not stored yet).

    Returns:
        ``runs`` and ``curves`` (one row per (row, seed), and per training step), ``summary`` (mean and interval
        per row and metric, the difference from ``<study>.base`` and whether it exceeds its interval),
        ``stability`` (``reporting.stability_table``), both in ``markdown`` after the findings in words
        (``reporting.findings_markdown``) and with the (row, seed) runs not stored yet named, the ``curves_plot``, ``gold_plot`` and ``frontier_plot`` figures, and ``metrics``: each row's
        means as ``<study>/<row>/<metric>`` MLflow metrics (a new run has none yet, so ``--only-missing-outputs``
        reruns this node, and the check below, every time).

    Raises:
        ValueError: A stored result is from other settings than the run's (a rerun with
            ``--only-missing-outputs`` after a change): names the results to delete; or no result is stored.
    """
    from rlhf_pipeline import reporting

    missing = [key.removeprefix("result__").replace("__", ".") for key, result in results.items() if result is None]
    results = {key: result for key, result in results.items() if result is not None}
    if not results:
        raise ValueError(f"{study}: no (row, seed) result is stored yet; run kedro run --pipeline {study}")

    def run_settings(result: dict[str, Any]) -> PPOSettings:
        return row_settings(ppo, parameters, launcher, study=study, row=result["variant"], seed=result["seed"])

    stale = [f"{result['variant']}.seed_{result['seed']}" for result in results.values()
             if result["key"] != settings_key(run_settings(result), sft_scores, evaluation, parameters)]
    if stale:
        paths = " ".join(f"data/07_model_output/{study}/{s.replace('.', '/')}/result.json" for s in stale)
        raise ValueError(f"stored {study} results from other settings or models: "
                         f"{', '.join(f'{study}.{s}.result' for s in stale)}; to train them again with the run's "
                         f"settings, delete them (with the catalog's paths: rm {paths}) and run again")
    if missing:
        logger.warning("%s: %d (row, seed) run(s) not stored yet, left out of the summary: %s", study, len(missing),
                       ", ".join(missing))
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curves", "key", "study")} for r in results.values()])
    curves = pd.DataFrame([{"variant": r["variant"], "seed": r["seed"], **c} for r in results.values() for c in r["curves"]])
    level, window = parameters["level"], parameters["window"]
    summary = reporting.summary_table(runs, parameters["base"], level)
    stability = reporting.stability_table(curves, window, level)
    findings = reporting.findings_markdown(summary, stability, parameters["base"], level)
    markdown = ((f"{findings}\n" if findings else "") + reporting.summary_markdown(summary, parameters["base"], level)
                + "\n" + reporting.stability_markdown(stability, window, level)
                + (f"\nNot stored yet (left out): {', '.join(missing)}.\n" if missing else ""))
    logger.info("%s over %d (row, seed) runs:\n%s", study, len(runs), markdown)
    means = {row["variant"]: {m: row[m] for m in reporting.SUMMARY_METRICS if m in row} for _, row in summary.iterrows()}
    return {"runs": runs, "curves": curves, "summary": summary, "stability": stability, "markdown": markdown,
            "curves_plot": reporting.plot_training_curves(curves, level, window),
            "gold_plot": reporting.plot_gold(summary, runs, sft_metrics.get("gold_score")),
            "frontier_plot": reporting.plot_frontier(curves, window),
            "metrics": as_metrics(means, study)}
