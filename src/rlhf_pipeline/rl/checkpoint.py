"""PPO checkpoints: the engines (weights, optimiser, scheduler) through DeepSpeed, the trainer's state as JSON,
each rank's RNG states as safetensors; and the rule for what may change between a run and its resume.

A checkpoint resumes only a run whose updates it would continue: the same algorithm settings and the same
inputs (``models.fingerprint``: SFT policy, reward model, tokenizer, prompts, world size). Settings that leave
every update unchanged - how often it saves, how a mini-batch is split into micro-batches or packed, how
scoring passes are chunked, what is monitored - may change, so a run can be re-split to fit memory; so may a
larger ``iterations``, which extends the run: the learning-rate schedules then decay over the longer run from
the step reached (as a run planned that long would not have: its warm-up and decay differ). Anything else is
refused with the names of what changed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from rlhf_pipeline.rl.config import PPOConfig, json_config
from rlhf_pipeline.training.engine import world

logger = logging.getLogger(__name__)

TAG = re.compile(r"iteration_\d+")
OWN_FILE = re.compile(r"iteration_\d+(\.json|_rng_rank\d+\.safetensors)")
ENGINE_FILES = ("latest", "zero_to_fp32.py")
"""What DeepSpeed's ``save_checkpoint`` writes beside its tag folders."""

RESUMABLE_CHANGES = frozenset({
    "iterations", "checkpoint_every", "keep_checkpoints", "micro_batch_size", "micro_batch_tokens", "packing",
    "forward_batch_size", "sample_every", "sample_count", "alarm_kl", "alarm_perplexity_drop", "alarm_length_growth",
    "stop_on_alarm",
})
"""Settings that do not change an update (tests/rl: micro-batching and packing give the same update), except
the micro-batch split under an entropy term, and ``iterations``, which extends the schedules."""


def resume_conflicts(saved: dict, cfg: PPOConfig, inputs: dict) -> list[str]:
    """The names of the settings and inputs that differ between a checkpoint's state and this run, beyond
    ``RESUMABLE_CHANGES`` (less the micro-batch split when ``entropy_coef`` > 0: its ``|H - target|`` is
    taken per micro-batch); ``iterations`` may only grow past the checkpoint's iteration."""
    current = json_config(cfg)
    saved_config = saved.get("config", {})
    resumable = RESUMABLE_CHANGES
    if cfg.entropy_coef:  # |H - target| is taken per micro-batch: another split changes the update
        resumable = resumable - {"micro_batch_size", "micro_batch_tokens", "packing"}
    changed = sorted(k for k, v in current.items() if k not in resumable and saved_config.get(k) != v)
    if cfg.iterations < saved["iteration"]:
        changed.append(f"iterations ({cfg.iterations} < the checkpoint's {saved['iteration']})")
    changed += sorted(f"input {k}" for k, v in inputs.items() if saved.get("inputs", {}).get(k) != v)
    return changed


class CheckpointStore:
    """A run's checkpoint folder: ``latest`` names the newest tag ``iteration_<n>``; ``complete`` marks a
    finished run. Every rank calls ``save``/``load`` (DeepSpeed saves each rank's shards)."""

    def __init__(self, folder: str | Path, keep: int):
        self.folder, self.keep = Path(folder), keep

    def latest(self) -> str | None:
        """The tag to resume from, or None for a fresh start (no checkpoint, or a finished run)."""
        if (self.folder / "complete").exists() or not (self.folder / "latest").exists():
            return None
        return (self.folder / "latest").read_text().strip()

    def clear(self) -> None:
        """Rank 0 deletes what a previous run left here - the markers, ``iteration_<n>`` states and RNG files, and
        the engines' ``iteration_<n>`` folders and DeepSpeed's own files beside them - and nothing else; every rank
        waits for it. Called by a run that starts afresh, before its first save."""
        if world()[0] == 0 and self.folder.exists():
            if (self.folder / "complete").exists():
                logger.info("%s: starting afresh over a finished run", self.folder)
            own = [self.folder / "latest", self.folder / "complete",
                   *(p for p in self.folder.glob("iteration_*") if OWN_FILE.fullmatch(p.name))]
            for engine in ("policy", "critic"):
                own += [self.folder / engine / name for name in ENGINE_FILES]
                for tag in (p for p in (self.folder / engine).glob("iteration_*") if TAG.fullmatch(p.name)):
                    shutil.rmtree(tag)
            for path in own:
                path.unlink(missing_ok=True)
        barrier()

    def save(self, iteration: int, engines: dict, state: dict, rng: dict) -> None:
        """Save ``engines`` (name -> DeepSpeed engine), rank 0's ``state`` (JSON) and this rank's ``rng`` tensors."""
        tag = f"iteration_{iteration}"
        for name, engine in engines.items():
            engine.save_checkpoint(str(self.folder / name), tag=tag)
        rank = world()[0]
        save_file(rng, str(self.folder / f"{tag}_rng_rank{rank}.safetensors"))
        barrier()  # every rank's files are written before ``latest`` names the tag
        if rank == 0:
            (self.folder / f"{tag}.json").write_text(json.dumps(state))
            (self.folder / "latest").write_text(tag)
            self.prune(list(engines))
        logger.info("Saved checkpoint %s", tag)

    def state(self, tag: str) -> dict:
        """The JSON ``state`` that ``save`` wrote with checkpoint ``tag`` (``<tag>.json``).

        Raises:
            FileNotFoundError: No state was saved for ``tag``.
        """
        return json.loads((self.folder / f"{tag}.json").read_text())

    def load(self, tag: str, engines: dict) -> dict:
        """Load ``engines`` and return this rank's RNG tensors. DeepSpeed's loader reads only files this store
        wrote itself (``weights_only`` where torch allows it); it is never pointed at downloaded data."""
        for name, engine in engines.items():
            engine.load_checkpoint(str(self.folder / name), tag=tag)
        return load_file(str(self.folder / f"{tag}_rng_rank{world()[0]}.safetensors"))

    def mark_complete(self, iteration: int) -> None:
        """Rank 0 marks the run finished: the next run in this folder starts afresh and overwrites it."""
        if world()[0] == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "complete").write_text(str(iteration))

    def prune(self, engines: list[str]) -> None:
        """Delete all but the latest ``keep`` checkpoints (the engines' folders, the state and RNG files)."""
        tags = sorted((int(p.stem.split("_")[1]) for p in self.folder.glob("iteration_*.json")), reverse=True)
        for iteration in tags[self.keep:]:
            tag = f"iteration_{iteration}"
            for engine in engines:
                shutil.rmtree(self.folder / engine / tag, ignore_errors=True)
            for path in [self.folder / f"{tag}.json", *self.folder.glob(f"{tag}_rng_rank*.safetensors")]:
                path.unlink(missing_ok=True)


def barrier() -> None:
    """Wait until every rank gets here (``torch.distributed.barrier``); returns at once with one rank."""
    if world()[1] > 1:
        import torch.distributed

        torch.distributed.barrier()
