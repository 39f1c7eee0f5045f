"""What each launched rank runs: the job's registered stage on the job folder's inputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rlhf_pipeline.launch.job import METRICS_FILE, JobSpec, jsonl_logger
from rlhf_pipeline.launch.stages import STAGES, StageInputs, write_output
from rlhf_pipeline.training.engine import init_distributed, no_logging, world


def run_worker(job_dir: str) -> None:
    """Run ``<job_dir>/job.json``'s stage; rank 0 logs its metrics to ``output/metrics.jsonl`` (the caller replays
    them into its own ``LogFn``) and writes the output models and results."""
    init_distributed()  # the launcher's process group, before anything asks for this rank
    job = Path(job_dir)
    spec = JobSpec.read(job)
    output = job / "output"
    frames = {path.stem: pd.read_parquet(path) for path in job.glob("*.parquet")}
    rank0 = world()[0] == 0
    log = jsonl_logger(output / METRICS_FILE) if rank0 else no_logging
    result = STAGES[spec.stage].run(StageInputs({}, frames, job), spec, log)
    if rank0:
        write_output(result, output)
