"""Nodes of the data_processing pipeline: parse and validate the raw rows of every source, split by prompt."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_pipeline.data import SPLITS, assign_splits, parse_rows, raw_rows
from rlhf_pipeline.formats import SourceFormat
from rlhf_pipeline.pipelines.tracking import as_metrics
from rlhf_pipeline.task import classify_request

logger = logging.getLogger(__name__)


# each raw source: its catalog entry and the kind of row it holds
SOURCES = {"preferences": ("raw_preferences", "preference"), "sft_train": ("raw_sft_train", "instruction"),
           "ppo_prompts": ("raw_ppo_prompts", "prompt"), "tune_prompts": ("raw_tune_prompts", "prompt"),
           "eval_prompts": ("raw_eval_prompts", "prompt")}
# keys of data_processing.sources.<name> that the catalogs read from the command line (runtime parameters)
CATALOG_KEYS = {"preferences": {"paths", "hub_id", "hub_split", "data_dir"}, "sft_train": {"paths"},
                "ppo_prompts": {"paths"}, "tune_prompts": {"paths"}, "eval_prompts": {"paths"}}
# splits no training stage reads, each held out from every training split; in this order, so that a prompt the
# evaluation holds is never a tuning prompt
HELD_OUT = ("eval_prompts", "tune_prompts")


def source_formats(data_processing: dict[str, Any]) -> dict[str, SourceFormat]:
    """How each source is read (``data_processing.sources.<name>``: ``format``, ``columns``; ``system``).

    Raises:
        ValueError: An unknown source or key, or an invalid format, column mapping or ``system`` (named by key).
    """
    settings = data_processing.get("sources") or {}
    unknown = set(settings) - set(SOURCES)
    if unknown:
        raise ValueError(f"data_processing.sources: unknown source(s) {sorted(unknown)}; valid: {list(SOURCES)}")
    formats = {}
    for name, (_, kind) in SOURCES.items():
        given = dict(settings.get(name) or {})
        stray = set(given) - {"format", "columns"} - CATALOG_KEYS[name]
        if stray:
            raise ValueError(f"data_processing.sources.{name}: unknown key(s) {sorted(stray)}; valid: format, "
                             f"columns, and on the command line {', '.join(sorted(CATALOG_KEYS[name]))}")
        try:
            formats[name] = SourceFormat(kind, given.get("format", "auto"), given.get("columns") or {},
                                         data_processing.get("system", "keep"))
        except ValueError as err:
            raise ValueError(f"data_processing.sources.{name}: {err}") from None
    return formats


def check_given_paths(name: str, raw: Any, data_processing: dict[str, Any]) -> None:
    """Raise ``ValueError`` when ``data_processing.sources.<name>.paths`` names files the catalog did not read:
    the catalog reads ``paths`` from the command line only, so ``paths`` in a parameters file would be ignored."""
    given = (data_processing.get("sources") or {}).get(name) or {}
    split = given.get("hub_split")
    if split is not None and getattr(raw, "split", split) != split:
        raise ValueError(f"data_processing.sources.{name}.hub_split {split!r} was not read (the loaded split is "
                         f"{raw.split!r}): the catalog takes it from the command line (--params)")
    paths = given.get("paths")
    if not paths:
        return
    read = {row.source for row in raw} if isinstance(raw, list) else set()
    if not read or not read <= {str(Path(path)) for path in paths}:
        raise ValueError(f"data_processing.sources.{name}.paths {list(paths)} were not read: the catalog takes them "
                         f"from the command line (--params \"data_processing.sources.{name}.paths=[FILE]\"); in a "
                         f"parameters file, name the files in an environment's catalog entry instead "
                         f"(docs/data_formats.md)")


def parse_sources(data_processing: dict[str, Any], **raws: Any) -> dict[str, pd.DataFrame | dict[str, dict[str, float]]]:
    """Parse and validate the raw rows of every source the environment's catalog names.

    Args:
        data_processing: ``strict`` (stop at the first bad row with ``RowError`` naming file, line and reason,
            instead of quarantining it), ``system`` and ``sources.<name>.format``/``columns`` (``formats``).
        **raws: By catalog entry (``SOURCES``): ``raw_preferences``, preference rows: line-numbered ``RawRow``s (the
            embedded task's file, local files), a ``datasets.Dataset`` or one-split ``DatasetDict`` (the hub), or a
            ``pandas.DataFrame`` of records; ``raw_sft_train``, ``raw_ppo_prompts``, ``raw_tune_prompts``,
            ``raw_eval_prompts``: a stage's own rows (any of the above), or no rows (``[]``, or not given): the
            split then comes from the preference pairs.

    Returns:
        By name: ``preferences`` (``prompt``, ``chosen``, ``rejected``), ``stage_rows`` (``split``, ``prompt``,
        ``response``: the stages' own rows, ``response`` empty for prompts), ``quarantine`` (every source's bad rows
        with ``source``, ``line``, ``reason``, ``raw``), ``source_formats`` (each given source's format, as
        detected or set) and ``parse_counts`` (``data/<source>_valid`` and ``_quarantined``).

    Raises:
        ValueError: A source whose rows all fail (the message names its format, the counts and the top
            reasons), a format that cannot be told from the fields, an unknown setting or source, or (strict) a
            bad row.
        TypeError: A raw source of another type.
    """
    if unknown := set(raws) - {entry for entry, _ in SOURCES.values()}:
        raise ValueError(f"parse_sources: unknown source(s) {sorted(unknown)}; valid: {[e for e, _ in SOURCES.values()]}")
    formats = source_formats(data_processing)
    results, quarantine, counts = {}, [], {}
    for name, (entry, _) in SOURCES.items():
        raw = raws.get(entry, [])
        check_given_paths(name, raw, data_processing)
        if name != "preferences" and isinstance(raw, list) and not raw:
            continue  # no source of its own
        result = parse_rows(raw_rows(raw, name=entry), formats[name], data_processing["strict"], name=entry)
        if not result.rows:
            reasons = "; ".join(f"{count} x {reason}" for reason, count in result.top_reasons())
            raise ValueError(f"{entry}: no valid row (format '{result.format}', {len(result.quarantine)} row(s) "
                             f"quarantined; top reasons: {reasons or 'no rows'}); see data_processing.sources.{name} "
                             f"(format, columns) and docs/data_formats.md")
        if result.quarantine:
            logger.warning("%s: quarantined %d bad row(s): %s", entry, len(result.quarantine),
                           dict(result.top_reasons(10)))
        logger.info("%s: %d valid %s row(s), format '%s'", entry, len(result.rows), formats[name].kind, result.format)
        results[name], quarantine = result, quarantine + result.quarantine
        counts |= {f"{name}_valid": len(result.rows), f"{name}_quarantined": len(result.quarantine)}
    stage_rows = [{"split": name, "prompt": row["prompt"], "response": row.get("response")}
                  for name, result in results.items() if name != "preferences" for row in result.records()]
    return {"preferences": pd.DataFrame(results["preferences"].records(), columns=["prompt", "chosen", "rejected"]),
            "stage_rows": pd.DataFrame(stage_rows, columns=["split", "prompt", "response"]),
            "quarantine": pd.DataFrame(quarantine, columns=["source", "line", "reason", "raw"]),
            "source_formats": {name: result.format for name, result in results.items()},
            "parse_counts": as_metrics(counts, "data")}


def split_preferences(
    preferences: pd.DataFrame, stage_rows: pd.DataFrame, split: dict[str, Any], ppo: dict[str, dict[str, Any]],
    launcher: dict[str, Any],
) -> dict[str, pd.DataFrame | dict[str, dict[str, float]]]:
    """De-duplicate pairs and split them by prompt, so that no prompt crosses two splits; a stage's own rows
    replace its split.

    Args:
        preferences: Valid pairs from ``parse_sources``.
        stage_rows: The stages' own rows from ``parse_sources`` (``split``, ``prompt``, ``response``). A split with
            rows here takes none of the pairs (its fraction counts as 0).
        split: ``fractions`` per split name, the ``seed`` of the prompt hashing and ``max_pairs`` (optional: a
            seeded sample of at most this many pairs is split, for a run on a budget).
        ppo: The PPO variants' parameters (``params:ppo``); each one's ``rollout_batch_size`` and
            ``launcher.num_processes`` (over the run's ``launcher``) give the prompts it rolls out per iteration.
        launcher: The run's ``params:launcher``.

    Returns:
        By name: ``sft_train`` (prompt, response), ``rm_train`` and ``rm_val`` (prompt, chosen, rejected),
        ``ppo_prompts``, ``tune_prompts`` (the tuning study's) and ``eval_prompts`` (unique prompts, with the request
        category), ``judge_train`` (pairs for the evaluation's judge reward model, which PPO never optimises), and
        ``split_sizes`` (with ``data/<split>_leaked``, the prompts removed from a held-out split because another
        split holds them (``held_out``), and
        ``data/shared_prompts_<a>__<b>`` for two training splits that share prompts, both logged as warnings).

    Raises:
        ValueError: A split is empty, or ``ppo_prompts`` holds fewer prompts than a PPO variant rolls out per
            iteration (its buffers would repeat prompts): here, before any stage trains.
    """
    pairs = preferences.drop_duplicates(["prompt", "chosen", "rejected"], ignore_index=True)
    logger.info("Dropped %d duplicate pair(s)", len(preferences) - len(pairs))
    if split.get("max_pairs") and len(pairs) > split["max_pairs"]:  # a budget run on a sample of a large set
        pairs = pairs.sample(n=split["max_pairs"], random_state=split["seed"]).reset_index(drop=True)
        logger.info("Kept a seeded sample of %d pair(s) (data_processing.split.max_pairs)", len(pairs))
    own = sorted(set(stage_rows["split"]))
    fractions = {name: 0.0 if name in own else value for name, value in split["fractions"].items()}
    if own:
        logger.info("Split(s) %s come from their own source; the pairs fill the others", own)
    pairs = pairs.assign(split=assign_splits(pairs["prompt"], fractions, split["seed"]))

    def pairs_of(name: str) -> pd.DataFrame:
        return pairs.loc[pairs["split"] == name, ["prompt", "chosen", "rejected"]].reset_index(drop=True)

    def prompts_of(prompts: pd.Series) -> pd.DataFrame:
        prompts = prompts.drop_duplicates().reset_index(drop=True)
        return pd.DataFrame({"prompt": prompts, "category": [classify_request(p).category for p in prompts]})

    def given(name: str) -> pd.DataFrame:
        return stage_rows.loc[stage_rows["split"] == name].reset_index(drop=True)

    outputs = {name: prompts_of(pairs.loc[pairs["split"] == name, "prompt"]) if name.endswith("_prompts")
               else pairs_of(name) for name in SPLITS}
    outputs["sft_train"] = outputs["sft_train"][["prompt", "chosen"]].rename(columns={"chosen": "response"})
    for name in own:
        rows = given(name)
        outputs[name] = (rows[["prompt", "response"]].drop_duplicates(ignore_index=True) if name == "sft_train"
                         else prompts_of(rows["prompt"]))
    outputs, overlaps = held_out(outputs)
    for name, frame in outputs.items():
        if frame.empty and overlaps.get(f"{name}_leaked"):
            fix = (f"use {name} that no other source holds" if name in own else
                   f"give {name} a source of its own, or use sources whose prompts differ")
            raise ValueError(f"data_processing.split: every prompt of '{name}' ({overlaps[f'{name}_leaked']}) is "
                             f"also in another split, so none is held out: the sources share prompts; {fix}")
        if frame.empty and name == "tune_prompts":  # only the tuning study reads it
            logger.warning("No tuning prompts (data_processing.split.fractions.tune_prompts): the tuning study "
                           "cannot run")
        elif frame.empty:
            raise ValueError(f"data_processing.split: split '{name}' is empty; raise its fraction or the data size")
    check_ppo_prompts(len(outputs["ppo_prompts"]), split, ppo, launcher)
    sizes = {f"{name}_size": len(frame) for name, frame in outputs.items()} | overlaps
    return {**outputs, "split_sizes": as_metrics(sizes, "data")}


def held_out(outputs: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """``outputs`` with each ``HELD_OUT`` split (``eval_prompts``, then ``tune_prompts``) cut to the prompts that no
    training split and no held-out split before it holds, and the counts: ``<split>_leaked`` (prompts removed) and
    ``shared_prompts_<a>__<b>`` for two training splits that share prompts (kept: PPO on the SFT prompts is a
    choice, not a leak). Each is logged as a warning."""
    prompts = {name: set(frame["prompt"]) for name, frame in outputs.items()}
    seen = set().union(*(p for name, p in prompts.items() if name not in HELD_OUT))
    outputs, counts = dict(outputs), {}
    for name in HELD_OUT:
        leaked = outputs[name]["prompt"].isin(seen)
        counts[f"{name}_leaked"] = int(leaked.sum())
        if leaked.any():
            logger.warning("Removed %d prompt(s) of '%s' that other splits hold (it is held out)", leaked.sum(), name)
        outputs[name] = outputs[name].loc[~leaked].reset_index(drop=True)
        seen |= set(outputs[name]["prompt"])
    names = [name for name in SPLITS if name not in HELD_OUT]
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = len(prompts[first] & prompts[second])
            if shared:
                logger.warning("Splits '%s' and '%s' share %d prompt(s)", first, second, shared)
                counts[f"shared_prompts_{first}__{second}"] = shared
    return outputs, counts


def check_ppo_prompts(prompts: int, split: dict[str, Any], ppo: dict[str, dict[str, Any]],
                      launcher: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the variants whose experience buffer (``rollout_batch_size`` prompts on
    each of ``launcher.num_processes`` ranks per node, the variant's own over the run's ``launcher``; a lower
    bound for multi-node runs) is larger than the
    ``prompts`` of the ``ppo_prompts`` split: PPO would fill each buffer with repeats of the same prompts."""
    from rlhf_pipeline.launch import LaunchConfig
    from rlhf_pipeline.rl.config import PPOConfig

    short = {}
    for variant, settings in ppo.items():
        processes = LaunchConfig.from_params(launcher, settings.get("launcher"), f"ppo/{variant}").num_processes
        rollout = settings.get("rollout_batch_size", PPOConfig.rollout_batch_size)
        if rollout * processes > prompts:
            short[variant] = f"ppo.{variant}.rollout_batch_size {rollout} x {processes} process(es)"
    if short:
        raise ValueError(
            f"data_processing.split: split 'ppo_prompts' holds {prompts} prompt(s), fewer than one PPO iteration "
            f"rolls out ({'; '.join(short.values())}), so every buffer would repeat prompts; raise "
            f"data_processing.split.fractions.ppo_prompts (now {split['fractions'].get('ppo_prompts', 0)}) or the "
            f"data (task.num_pairs of the embedded task, data_processing.split.max_pairs), or lower the "
            f"rollout_batch_size of {', '.join(f'ppo.{variant}' for variant in short)}")
