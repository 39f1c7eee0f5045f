"""Run SFT, reward-model and PPO training in this process, or across processes with the ``deepspeed`` launcher.

``run_sft``, ``run_reward_training`` and ``run_ppo`` train in-process when one process is configured. With
more (GPUs, CPU ranks, or nodes from a hostfile) they write a job folder - models as ``save_pretrained``
directories, data as Parquet, the stage and its config as JSON - and run ``deepspeed [--hostfile H]
--num_gpus N --module rlhf_pipeline.launch <job>`` as a subprocess. Every rank trains on its own share of
the data (PPO: rolls out its own share of the prompts), reading ZeRO-3 models straight into its partition,
and ZeRO shards the training state; rank 0 logs into the caller's MLflow run (``MLFLOW_RUN_ID`` and
``MLFLOW_TRACKING_URI`` in the environment) and writes the results back to the job folder, which the
caller loads and returns.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from rlhf_pipeline.config import config_from
from rlhf_pipeline.modeling import ModelBundle, ValueHeadModel, load_policy, load_value_model
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.models import load_models
from rlhf_pipeline.rl.trainer import PPOResult, PPOTrainer
from rlhf_pipeline.training.devices import release_device_memory
from rlhf_pipeline.training.engine import (
    LogFn,
    OptimConfig,
    child_environment,
    no_logging,
    resident_parameters,
    world,
)
from rlhf_pipeline.training.reward import RewardConfig, train_reward_model
from rlhf_pipeline.training.sft import SFTConfig, train_sft

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchConfig:
    """Where a training stage runs."""

    num_processes: int = 1
    """Processes per node (GPUs, or CPU ranks without GPUs); 1 trains in this process."""
    hostfile: str | None = None
    """DeepSpeed hostfile (``host slots=N`` per line) for multi-node runs."""
    master_port: int = 29500
    job_dir: str = "data/06_models/ppo/job"
    """Folder for the launcher's inputs and outputs."""
    timeout_s: float | None = None
    """Wall-clock limit of the launched job (None: none); a job past it is killed and the node fails."""


def launch_job(launch: LaunchConfig, models: dict[str, ModelBundle], frames: dict[str, pd.DataFrame],
               spec: dict) -> Path:
    """Write a fresh job folder (the models, the data, the spec) and run it on ``launch.num_processes`` ranks per
    node (and the hostfile's nodes); returns its output folder. The caller's models leave the GPUs first,
    because the ranks load their own copies."""
    job = Path(launch.job_dir)
    if job.exists():
        shutil.rmtree(job / "output", ignore_errors=True)
    job.mkdir(parents=True, exist_ok=True)
    for name, bundle in models.items():
        bundle.save_pretrained(str(job / name))
        bundle.model.to("cpu")
    release_device_memory()
    for name, frame in frames.items():
        frame.to_parquet(job / f"{name}.parquet")
    (job / "job.json").write_text(json.dumps(spec, indent=2, default=str))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(launch.master_port)]
    if launch.hostfile:
        command += ["--hostfile", launch.hostfile]
    command += ["--num_gpus", str(launch.num_processes), "--module", "rlhf_pipeline.launch", str(job.resolve())]
    logger.info("Launching %s on %d process(es) per node: %s", spec["stage"], launch.num_processes, " ".join(command))
    run_job(command, launch.timeout_s)
    return job / "output"


def in_process(launch: LaunchConfig) -> bool:
    return launch.num_processes <= 1 and not launch.hostfile


def run_sft(model: ModelBundle, train: tuple[list[str], list[str]], val: tuple[list[str], list[str]], cfg: SFTConfig,
            launch: LaunchConfig, log: LogFn = no_logging, metric_prefix: str = "") -> tuple[torch.nn.Module, dict]:
    """``train_sft`` on (prompts, responses) in-process or through the launcher; the model and its metrics."""
    if in_process(launch):
        return train_sft(model.model, model.encoder(), *train, *val, cfg, log)
    frames = {"train": pd.DataFrame({"prompt": train[0], "response": train[1]}),
              "val": pd.DataFrame({"prompt": val[0], "response": val[1]})}
    output = launch_job(launch, {"model": model}, frames,
                        {"stage": "sft", "config": asdict(cfg), "metric_prefix": metric_prefix})
    return load_policy(str(output / "model")).model, json.loads((output / "metrics.json").read_text())


def run_reward_training(model: ModelBundle, pairs: pd.DataFrame, cfg: RewardConfig, launch: LaunchConfig,
                        log: LogFn = no_logging, metric_prefix: str = "", description: str = "reward_model",
                        ) -> tuple[ValueHeadModel, dict[str, int]]:
    """``train_reward_model`` on ``prompt``/``chosen``/``rejected`` pairs (``model``: a value-head model) in-process
    or through the launcher; the model and its fitting counts."""
    if in_process(launch):
        return train_reward_model(model.model, model.encoder(), pairs["prompt"].tolist(), pairs["chosen"].tolist(),
                                  pairs["rejected"].tolist(), cfg, log, description)
    output = launch_job(launch, {"model": model}, {"pairs": pairs[["prompt", "chosen", "rejected"]]},
                        {"stage": "reward", "config": asdict(cfg), "metric_prefix": metric_prefix,
                         "description": description})
    return load_value_model(str(output / "model")).model, json.loads((output / "metrics.json").read_text())


def run_ppo(policy: ModelBundle, reward_model: ModelBundle, prompts: list[str], ptx_data: tuple[list[str], list[str]],
            cfg: PPOConfig, launch: LaunchConfig, checkpoint_dir: str | None = None,
            score_prior: tuple[float, float, float] | None = None, log: LogFn = no_logging,
            metric_prefix: str = "") -> PPOResult:
    """Train with PPO in-process or through the ``deepspeed`` launcher (see the module docstring)."""
    if in_process(launch):  # the run owns its models: the caller's stay as they are (e.g. the RM scores next)
        trainer = PPOTrainer(copy.deepcopy(policy.model), copy.deepcopy(reward_model.model), policy.encoder(), prompts,
                             cfg, checkpoint_dir=checkpoint_dir, ptx_data=ptx_data, log=log, score_prior=score_prior)
        return trainer.train()
    frames = {"prompts": pd.DataFrame({"prompt": prompts}),
              "ptx": pd.DataFrame({"prompt": ptx_data[0], "response": ptx_data[1]})}
    output = launch_job(launch, {"policy": policy, "reward_model": reward_model}, frames, {
        "stage": "ppo", "config": asdict(cfg), "checkpoint_dir": checkpoint_dir, "score_prior": score_prior,
        "metric_prefix": metric_prefix})
    samples = json.loads((output / "samples.json").read_text())
    history = json.loads((output / "history.json").read_text())
    status = json.loads((output / "status.json").read_text())
    return PPOResult(load_policy(str(output / "policy")).model, history, samples, status["stopped_early"],
                     status["prompts_dropped"])


def run_job(command: list[str], timeout_s: float | None) -> None:
    """Run the launcher in its own process group, so that a timeout or an interrupt stops every rank it
    started, not only the launcher (orphaned ranks would hold the GPUs)."""
    process = subprocess.Popen(command, env=launch_environment(), start_new_session=True)
    try:
        returncode = process.wait(timeout=timeout_s)
    except BaseException as stop:  # the timeout, or Ctrl-C in the kedro run
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if isinstance(stop, subprocess.TimeoutExpired):
            raise TimeoutError(f"the launched job ran past launcher.timeout_s = {timeout_s} s; it was stopped with its "
                               "ranks") from None
        raise
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)


def launch_environment() -> dict[str, str]:
    """The environment of the launched ranks: the caller's MLflow run, CPU-friendly defaults."""
    import mlflow

    env = child_environment()  # the launcher gives each rank its own RANK/MASTER_PORT
    run = mlflow.active_run()
    if run is not None:
        env.update(MLFLOW_RUN_ID=run.info.run_id, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    return env


def mlflow_rank0_logger(prefix: str) -> LogFn:
    """Rank 0 logs to the run named by ``MLFLOW_RUN_ID`` (the kedro run that launched it)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or world()[0] != 0:
        return no_logging
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()])

    return log


def ppo_worker(job: Path, spec: dict, output: Path) -> None:
    cfg = PPOConfig.from_params(spec["config"])
    policy, models = load_models(job, cfg)
    resident = {name: resident_parameters(model) for name, model in {"policy": policy.model, **models}.items()}
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    logger.info("Rank %d holds %s; peak host memory so far %.2f GiB", world()[0],
                ", ".join(f"{name} {held:,} of {total:,} parameters" for name, (held, total) in resident.items()),
                peak_gib)
    prompts = pd.read_parquet(job / "prompts.parquet")["prompt"].tolist()
    ptx = pd.read_parquet(job / "ptx.parquet")
    trainer = PPOTrainer(policy.model, encoder=policy.encoder(), prompts=prompts, cfg=cfg,
                         checkpoint_dir=spec["checkpoint_dir"], ptx_data=(ptx["prompt"].tolist(), ptx["response"].tolist()),
                         log=mlflow_rank0_logger(spec["metric_prefix"]),
                         score_prior=tuple(spec["score_prior"]) if spec["score_prior"] else None, **models)
    result = trainer.train()
    if world()[0] == 0:
        policy.with_model(result.policy).save_pretrained(str(output / "policy"))
        (output / "history.json").write_text(json.dumps(result.history))
        (output / "samples.json").write_text(json.dumps(result.samples))
        (output / "status.json").write_text(json.dumps({"stopped_early": result.stopped_early, "world_size": world()[1],
                                                           "prompts_dropped": result.prompts_dropped,
                                                           "rank0_parameters_at_load": resident,
                                                           "rank0_peak_host_gib_at_load": peak_gib}))


def sft_worker(job: Path, spec: dict, output: Path) -> None:
    cfg = config_from(SFTConfig, spec["config"], optim=OptimConfig)
    model = load_policy(str(job / "model"))
    train, val = pd.read_parquet(job / "train.parquet"), pd.read_parquet(job / "val.parquet")
    trained, metrics = train_sft(model.model, model.encoder(), train["prompt"].tolist(), train["response"].tolist(),
                                 val["prompt"].tolist(), val["response"].tolist(), cfg,
                                 mlflow_rank0_logger(spec["metric_prefix"]))
    if world()[0] == 0:
        model.with_model(trained).save_pretrained(str(output / "model"))
        (output / "metrics.json").write_text(json.dumps({**metrics, "world_size": world()[1]}))


def reward_worker(job: Path, spec: dict, output: Path) -> None:
    cfg = config_from(RewardConfig, spec["config"], optim=OptimConfig)
    model = load_value_model(str(job / "model"))
    pairs = pd.read_parquet(job / "pairs.parquet")
    trained, counts = train_reward_model(model.model, model.encoder(), pairs["prompt"].tolist(), pairs["chosen"].tolist(),
                                         pairs["rejected"].tolist(), cfg, mlflow_rank0_logger(spec["metric_prefix"]),
                                         spec["description"])
    if world()[0] == 0:
        model.with_model(trained).save_pretrained(str(output / "model"))
        (output / "metrics.json").write_text(json.dumps({**counts, "world_size": world()[1]}))


WORKERS = {"ppo": ppo_worker, "sft": sft_worker, "reward": reward_worker}


def worker(job_dir: str) -> None:
    """Entry point of each launched rank: the stage named in the job's spec."""
    job = Path(job_dir)
    spec = json.loads((job / "job.json").read_text())
    output = job / "output"
    output.mkdir(exist_ok=True)
    WORKERS[spec["stage"]](job, spec, output)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    worker(next(arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")))
