"""Running a training stage in this process or across processes with the ``deepspeed`` launcher (``stages``
holds the registry and the entry points; ``job`` the job folders and the launcher; ``worker`` each rank)."""

from rlhf_pipeline.launch.job import JobSpec, LaunchConfig
from rlhf_pipeline.launch.stages import run_ppo, run_reward_training, run_sft, run_stage

__all__ = ["JobSpec", "LaunchConfig", "run_ppo", "run_reward_training", "run_sft", "run_stage"]
