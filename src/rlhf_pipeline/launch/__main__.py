"""Entry point of each launched rank: ``python -m rlhf_pipeline.launch <job> [--local_rank=N]``."""

import logging
import sys

from rlhf_pipeline.launch.worker import run_worker

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_worker(next(arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")))
