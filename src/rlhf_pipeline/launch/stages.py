"""The stage registry: SFT, reward-model and PPO training, run in this process or through the launcher.

A stage is one function ``(inputs, spec, log) -> StageOutput``. ``run_stage`` calls it in this process when one
process is configured; otherwise it writes a job folder (``job``) and every launched rank's worker calls the
same function on the job's inputs. Either way the caller gets the same ``StageOutput`` and its ``LogFn`` sees the
same metric names. ``run_sft``, ``run_reward_training`` and ``run_ppo`` are the typed entry points.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rlhf_pipeline.baselines.trl_ppo import run_trl_ppo
from rlhf_pipeline.config import config_from
from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.launch.job import JobSpec, LaunchConfig, launch_job
from rlhf_pipeline.modeling import ModelBundle, ValueHeadModel, load_policy, load_value_model
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.models import load_models
from rlhf_pipeline.rl.trainer import PPOResult, PPOTrainer
from rlhf_pipeline.training.devices import release_device_memory
from rlhf_pipeline.training.engine import LogFn, OptimConfig, no_logging, resident_parameters, world
from rlhf_pipeline.training.reward import RewardConfig, train_reward_model
from rlhf_pipeline.training.sft import SFTConfig, train_sft

logger = logging.getLogger(__name__)

LOADERS: dict[str, Callable[[str], ModelBundle]] = {"policy": load_policy, "value": load_value_model}
"""How a model kind is read back from a ``save_pretrained`` directory."""


@dataclass
class StageInputs:
    """A stage's models and data: in memory (in-process), or in the launched ranks' job folder."""

    models: dict[str, ModelBundle]
    frames: dict[str, pd.DataFrame]
    job: Path | None = None

    def bundle(self, name: str, kind: str) -> ModelBundle:
        """The model ``name``: from ``models`` in-process, or, in a launched rank, read from the job folder's
        ``<job>/<name>`` directory by ``LOADERS[kind]`` (``kind``: ``policy`` or ``value``; unused in-process).

        Raises:
            KeyError: No model ``name`` in ``models`` (in-process), or an unknown ``kind`` (launched).
        """
        return self.models[name] if self.job is None else LOADERS[kind](str(self.job / name))


@dataclass
class StageOutput:
    """A stage's trained models and its JSON results (metrics, history, counts)."""

    models: dict[str, ModelBundle]
    results: dict


@dataclass(frozen=True)
class Stage:
    """A registered stage: the function every process runs, and the kinds of the models it returns."""

    run: Callable[[StageInputs, JobSpec, LogFn], StageOutput]
    outputs: dict[str, str]
    """Output model name -> kind (a key of ``LOADERS``)."""


def sft_stage(inputs: StageInputs, spec: JobSpec, log: LogFn) -> StageOutput:
    """The ``sft`` stage: ``train_sft`` from the ``model`` policy on the ``train`` and ``val`` frames'
    ``prompt``/``response`` columns, with ``spec.config`` read as an ``SFTConfig``.

    Returns:
        The trained ``model`` (with the input's tokenizer and prompt format) and SFT's metrics as the results.

    Raises:
        ValueError: An unknown or invalid key in ``spec.config``, or no demonstration fits ``max_length``.
    """
    cfg = config_from(SFTConfig, spec.config, optim=OptimConfig)
    model, train, val = inputs.bundle("model", "policy"), inputs.frames["train"], inputs.frames["val"]
    trained, metrics = train_sft(model.model, model.encoder(), train["prompt"].tolist(), train["response"].tolist(),
                                 val["prompt"].tolist(), val["response"].tolist(), cfg, log)
    return StageOutput({"model": model.with_model(trained)}, metrics)


def reward_stage(inputs: StageInputs, spec: JobSpec, log: LogFn) -> StageOutput:
    """The ``reward`` stage: ``train_reward_model`` from the ``model`` value-head model on the ``pairs`` frame's
    ``prompt``/``chosen``/``rejected`` columns, with ``spec.config`` read as a ``RewardConfig`` and
    ``spec.options["description"]`` naming the progress bar.

    Returns:
        The trained ``model`` (with the input's tokenizer and prompt format) and the fitting counts as the results.

    Raises:
        ValueError: An unknown or invalid key in ``spec.config``, or no pair fits ``max_length``.
    """
    cfg = config_from(RewardConfig, spec.config, optim=OptimConfig)
    model, pairs = inputs.bundle("model", "value"), inputs.frames["pairs"]
    trained, counts = train_reward_model(model.model, model.encoder(), pairs["prompt"].tolist(), pairs["chosen"].tolist(),
                                         pairs["rejected"].tolist(), cfg, log, spec.options["description"])
    return StageOutput({"model": model.with_model(trained)}, counts)


def ppo_stage(inputs: StageInputs, spec: JobSpec, log: LogFn) -> StageOutput:
    """PPO owns its models: in-process it trains copies (the caller's policy and RM stay as they are, e.g. for
    the next seed of an ablation); launched ranks read theirs from the job folder (``rl.models.load_models``)."""
    cfg = PPOConfig.from_params(spec.config)
    if inputs.job is None:
        policy = inputs.models["policy"].with_model(copy.deepcopy(inputs.models["policy"].model))
        models = {"reward_model": copy.deepcopy(inputs.models["reward_model"].model)}
    else:
        policy, models = load_models(inputs.job, cfg)
    at_load = {name: resident_parameters(model) for name, model in {"policy": policy.model, **models}.items()}
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    logger.info("Rank %d holds %s; peak host memory so far %.2f GiB", world()[0],
                ", ".join(f"{name} {held:,} of {total:,} parameters" for name, (held, total) in at_load.items()),
                peak_gib)
    ptx = inputs.frames["ptx"]
    prior = spec.options["score_prior"]
    trainer = PPOTrainer(policy.model, encoder=policy.encoder(), prompts=inputs.frames["prompts"]["prompt"].tolist(),
                         cfg=cfg, checkpoint_dir=spec.options["checkpoint_dir"],
                         ptx_data=(ptx["prompt"].tolist(), ptx["response"].tolist()), log=log,
                         score_prior=tuple(prior) if prior else None, **models)
    result = trainer.train()
    return StageOutput({"policy": policy.with_model(result.policy)},
                       {"history": result.history, "samples": result.samples, "stopped_early": result.stopped_early,
                        "prompts_dropped": result.prompts_dropped, "parameters_at_load": at_load,
                        "peak_host_gib_at_load": peak_gib})


STAGES: dict[str, Stage] = {
    "sft": Stage(sft_stage, {"model": "policy"}),
    "reward": Stage(reward_stage, {"model": "value"}),
    "ppo": Stage(ppo_stage, {"policy": "policy"}),
}


def run_stage(spec: JobSpec, models: dict[str, ModelBundle], frames: dict[str, pd.DataFrame], launch: LaunchConfig,
              log: LogFn = no_logging) -> StageOutput:
    """Run the registered stage ``spec.stage`` here or on ``launch.num_processes`` ranks (see the module
    docstring); launched, the caller's models leave the GPUs first, because the ranks load their own copies."""
    stage = STAGES[spec.stage]
    if launch.in_process:
        output = stage.run(StageInputs(models, frames), spec, log)
        return StageOutput(output.models, {**output.results, "world_size": 1, "device": trained_on(output)})

    def write_inputs(job: Path) -> None:
        for name, bundle in models.items():
            bundle.save_pretrained(str(job / name))
            bundle.model.to("cpu")
        release_device_memory()
        for name, frame in frames.items():
            frame.to_parquet(job / f"{name}.parquet")

    output = launch_job(launch, spec, write_inputs, log)
    return StageOutput({name: LOADERS[kind](str(output / name)) for name, kind in stage.outputs.items()},
                       json.loads((output / "results.json").read_text()))  # written by write_output


def run_sft(model: ModelBundle, train: tuple[list[str], list[str]], val: tuple[list[str], list[str]], cfg: SFTConfig,
            launch: LaunchConfig, log: LogFn = no_logging) -> tuple[torch.nn.Module, dict]:
    """``train_sft`` on (prompts, responses); the model and its metrics (with ``world_size`` and the ``device``
    it trained on). ``cfg.epochs`` 0 trains nothing: ``model``'s own module and no metrics (an instruction-tuned
    base model is the SFT model as it is)."""
    if cfg.epochs == 0:
        logger.info("SFT: sft.epochs is 0, the base model is the SFT model")
        return model.model, {}
    frames = {"train": pd.DataFrame({"prompt": train[0], "response": train[1]}),
              "val": pd.DataFrame({"prompt": val[0], "response": val[1]})}
    out = run_stage(JobSpec("sft", asdict(cfg)), {"model": model}, frames, launch, log)
    return out.models["model"].model, out.results


def run_reward_training(model: ModelBundle, pairs: pd.DataFrame, cfg: RewardConfig, launch: LaunchConfig,
                        log: LogFn = no_logging, description: str = "reward_model") -> tuple[ValueHeadModel, dict]:
    """``train_reward_model`` on ``prompt``/``chosen``/``rejected`` pairs (``model``: a value-head model); the model
    and its fitting counts (with ``world_size`` and the ``device`` it trained on)."""
    out = run_stage(JobSpec("reward", asdict(cfg), {"description": description}), {"model": model},
                    {"pairs": pairs[["prompt", "chosen", "rejected"]]}, launch, log)
    return out.models["model"].model, out.results


@dataclass(frozen=True)
class SFTSettings:
    """The sft stage's parameters (``params:sft``), typed: ``SFTConfig`` and what the node measures with."""

    train: SFTConfig
    launch: LaunchConfig
    """Where SFT trains (more than one process: through the ``deepspeed`` launcher)."""
    sampling: SamplingConfig
    """How the gold score of samples before and after SFT is measured."""
    val_fraction: float
    """Share of the prompts held out for the validation loss."""
    gold_eval_prompts: int
    """Held-out prompts sampled for the gold score."""

    @classmethod
    def from_params(cls, params: dict[str, Any], launcher: dict[str, Any]) -> SFTSettings:
        """``params:sft`` with the run's ``params:launcher`` (``sft.launcher`` keys over it; job folder
        ``<work_dir>/sft/job``). Raises ``ValueError``/``KeyError`` naming an unknown, missing or invalid key."""
        params = dict(params)
        val_fraction, gold_prompts = params.pop("val_fraction"), params.pop("gold_eval_prompts")
        launch = LaunchConfig.from_params(launcher, params.pop("launcher", None), "sft")
        sampling = config_from(SamplingConfig, params.pop("sampling"))
        train = config_from(SFTConfig, params, optim=OptimConfig)
        if train.epochs < 0:
            raise ValueError(f"sft.epochs must be >= 0 (0: the base model is the SFT model), got {train.epochs}")
        return cls(train, launch, sampling, val_fraction, gold_prompts)


@dataclass(frozen=True)
class PPOSettings:
    """One PPO run's parameters (``params:ppo.<variant>``, or an ablation row), typed."""

    name: str
    """The run, in metric names (``ppo/<name>/...``) and work folders."""
    trainer: str
    """``rlhf_pipeline`` (``run_ppo``) or ``trl`` (TRL's ``PPOTrainer``, ``baselines.trl_ppo``)."""
    checkpoint_dir: str
    """Where a run killed mid-way resumes from (the same command): ``<work_dir>/<folder>/checkpoints``."""
    launch: LaunchConfig
    train: PPOConfig

    @classmethod
    def from_params(cls, params: dict[str, Any], launcher: dict[str, Any], name: str,
                    folder: str | None = None) -> PPOSettings:
        """``params``: ``PPOConfig`` fields plus optional ``trainer`` and ``launcher`` (this run's keys over the
        run-wide ``launcher``); work folders under ``<work_dir>/<folder>`` (default ``ppo/<name>``).

        Raises:
            ValueError: An unknown trainer, TRL's trainer on more than one process, or an unknown, missing or
                invalid key (named).
        """
        params = dict(params)
        trainer = params.pop("trainer", "rlhf_pipeline")
        if trainer not in TRAINERS:
            raise ValueError(f"trainer: {trainer!r} is not one of {', '.join(map(repr, TRAINERS))}")
        launch = LaunchConfig.from_params(launcher, params.pop("launcher", None), folder or f"ppo/{name}")
        if trainer == "trl" and not launch.in_process:
            raise ValueError(f"trainer: 'trl' trains in one process; {name} asks for {launch.num_processes} process(es)"
                             f"{' and a hostfile' if launch.hostfile else ''}: set its launcher to num_processes 1")
        checkpoint_dir = str(Path(launch.job_dir).parent / "checkpoints")
        return cls(name, trainer, checkpoint_dir, launch, PPOConfig.from_params(params))


def score_prior(reward_model_metrics: dict[str, float]) -> tuple[float, float, float]:
    """(count, mean, std) of the RM's scores on training pairs (``fit_reward_model``'s metrics): where PPO's score
    normaliser starts."""
    return (float(reward_model_metrics.get("stats_count", 100)), reward_model_metrics["reward_mean"],
            reward_model_metrics["reward_std"])


def run_ppo(policy: ModelBundle, reward_model: ModelBundle, prompts: list[str], ptx_data: tuple[list[str], list[str]],
            cfg: PPOConfig, launch: LaunchConfig, checkpoint_dir: str | None = None,
            score_prior: tuple[float, float, float] | None = None, log: LogFn = no_logging) -> PPOResult:
    """Train with PPO; the caller's models are not changed (see ``ppo_stage``)."""
    frames = {"prompts": pd.DataFrame({"prompt": prompts}),
              "ptx": pd.DataFrame({"prompt": ptx_data[0], "response": ptx_data[1]})}
    spec = JobSpec("ppo", asdict(cfg), {"checkpoint_dir": checkpoint_dir, "score_prior": score_prior})
    out = run_stage(spec, {"policy": policy, "reward_model": reward_model}, frames, launch, log)
    results = out.results
    return PPOResult(out.models["policy"].model, results["history"], results["samples"], results["stopped_early"],
                     results["prompts_dropped"])


TRAINERS: dict[str, Callable[..., PPOResult]] = {"rlhf_pipeline": run_ppo, "trl": run_trl_ppo}
"""``PPOSettings.trainer`` -> the function that trains, all with ``run_ppo``'s signature."""


def write_output(output: StageOutput, folder: Path) -> None:
    """Rank 0 of a launched job: the output models as ``save_pretrained`` directories, the results as JSON."""
    for name, bundle in output.models.items():
        bundle.save_pretrained(str(folder / name))
    (folder / "results.json").write_text(json.dumps({**output.results, "world_size": world()[1],
                                                     "device": trained_on(output)}))


def trained_on(output: StageOutput) -> str:
    """The device type (``cuda``, ``cpu``) that the stage's trained models' weights sit on when it ends."""
    return ",".join(sorted({p.device.type for bundle in output.models.values() for p in bundle.model.parameters()}))
