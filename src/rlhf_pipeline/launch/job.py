"""Job folders and the ``deepspeed`` launcher: how a stage runs across processes.

A job folder holds the stage's models (``save_pretrained`` directories), its data (Parquet) and its typed spec
(``job.json``); ``deepspeed [--hostfile H] --num_gpus N --module rlhf_pipeline.launch <job>`` starts the ranks,
each running ``worker.run_worker``. Rank 0 writes the results into ``<job>/output`` and its live metrics, one
JSON line per step, into ``<job>/output/metrics.jsonl``; the caller replays each line into its own ``LogFn`` as
it appears, so launched and in-process runs log the same names through the same function.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline.config import config_from
from rlhf_pipeline.training.engine import LogFn, child_environment, free_port, no_logging

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class LaunchConfig:
    """Where a training stage runs."""

    num_processes: int = 1
    """Processes per node (GPUs, or CPU ranks without GPUs); 1 trains in this process."""
    hostfile: str | None = None
    """DeepSpeed hostfile (``host slots=N`` per line) for multi-node runs."""
    master_port: int | None = None
    """Port of the rank-0 rendezvous; None: a free port of this host, found at launch."""
    job_dir: str = "data/06_models/job"
    """Folder for the launcher's inputs and outputs."""
    timeout_s: float | None = None
    """Wall-clock limit of the launched job (None: none); a job past it is killed and the node fails."""

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"launcher.num_processes must be >= 1, got {self.num_processes}")
        if self.hostfile and self.master_port is None:  # rank 0 listens on the hostfile's first host, not here
            raise ValueError("launcher.master_port: with a hostfile, set a port that is free on its first host")

    @classmethod
    def from_params(cls, launcher: dict[str, Any], override: dict[str, Any] | None, folder: str) -> LaunchConfig:
        """The run's ``launcher`` parameters with one stage's own ``launcher`` keys over them (so that "8 GPUs" is
        one key for every stage), its job folder derived as ``<work_dir>/<folder>/job``.

        Raises:
            ValueError: An unknown key (named), or an invalid value.
        """
        merged = {**launcher, **(override or {})}
        if "job_dir" in merged:
            raise ValueError(f"launcher.job_dir: job folders are derived as <work_dir>/{folder}/job; set "
                             "launcher.work_dir instead")
        work_dir = merged.pop("work_dir", "data/06_models")
        return config_from(cls, {**merged, "job_dir": str(Path(work_dir) / folder / "job")})

    @property
    def in_process(self) -> bool:
        """One process and no hostfile: the stage runs in the caller's process."""
        return self.num_processes <= 1 and not self.hostfile


@dataclass(frozen=True)
class JobSpec:
    """What a launched stage runs: the registered ``stage``, its ``config`` (the stage's dataclass as JSON)
    and the stage's ``options`` (e.g. PPO's ``checkpoint_dir``)."""

    stage: str
    config: dict
    options: dict = field(default_factory=dict)

    def write(self, job: Path) -> None:
        """``<job>/job.json``."""
        (job / "job.json").write_text(json.dumps(asdict(self), indent=2, default=str))

    @classmethod
    def read(cls, job: Path) -> JobSpec:
        """From ``<job>/job.json`` (written by ``write``; JSON, nothing executable)."""
        return cls(**json.loads((job / "job.json").read_text()))


def jsonl_logger(path: Path) -> LogFn:
    """A ``LogFn`` appending ``{"step": step, "metrics": {...}}`` lines to ``path`` (flushed per line)."""

    def log(metrics: dict[str, float], step: int) -> None:
        with path.open("a") as out:
            out.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    return log


class MetricsTail:
    """Replays the complete lines that a rank appended to a ``jsonl_logger`` file into ``log``."""

    def __init__(self, path: Path, log: LogFn):
        self.path, self.log, self.offset = path, log, 0

    def poll(self) -> None:
        """Log every complete line written since the last poll (a partly written last line waits)."""
        if not self.path.exists():
            return
        with self.path.open() as lines:
            lines.seek(self.offset)
            while (line := lines.readline()).endswith("\n"):
                record = json.loads(line)
                self.log(record["metrics"], record["step"])
                self.offset = lines.tell()


def launch_job(launch: LaunchConfig, spec: JobSpec, write_inputs, log: LogFn = no_logging) -> Path:
    """Write a fresh job folder (``write_inputs(job)`` writes the models and data, then the spec) and run it on
    ``launch.num_processes`` ranks per node (and the hostfile's nodes), replaying rank 0's metrics into ``log``;
    returns its output folder."""
    job = Path(launch.job_dir)
    shutil.rmtree(job / "output", ignore_errors=True)
    (job / "output").mkdir(parents=True, exist_ok=True)
    write_inputs(job)
    spec.write(job)
    port = launch.master_port or free_port()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
    if launch.hostfile:
        command += ["--hostfile", launch.hostfile]
    command += ["--num_gpus", str(launch.num_processes), "--module", "rlhf_pipeline.launch", str(job.resolve())]
    logger.info("Launching %s on %d process(es) per node: %s", spec.stage, launch.num_processes, " ".join(command))
    run_job(command, launch.timeout_s, MetricsTail(job / "output" / METRICS_FILE, log))
    return job / "output"


def run_job(command: list[str], timeout_s: float | None, tail: MetricsTail | None = None) -> None:
    """Run the launcher in its own process group, so that a timeout or an interrupt stops every rank it
    started, not only the launcher (orphaned ranks would hold the GPUs); ``tail`` is polled every second.

    Raises:
        TimeoutError: the job ran past ``timeout_s``.
        subprocess.CalledProcessError: the launcher failed.
    """
    process = subprocess.Popen(command, env=child_environment(), start_new_session=True)
    waited = 0.0
    try:
        while True:
            try:
                returncode = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                waited += 1.0
                if tail:
                    tail.poll()
                if timeout_s is not None and waited >= timeout_s:
                    raise
    except BaseException as stop:  # the timeout, or Ctrl-C in the kedro run
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if isinstance(stop, subprocess.TimeoutExpired):
            raise TimeoutError(f"the launched job ran past launcher.timeout_s = {timeout_s} s; it was stopped with its "
                               "ranks") from None
        raise
    if tail:
        tail.poll()
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)
