"""Running a training stage in this process or across processes with the ``deepspeed`` launcher (``stages``
holds the registry, the stages' typed settings and the entry points; ``job`` the job folders and the launcher;
``worker`` each rank; ``reward`` the reward model's fitting and measurement)."""

from rlhf_pipeline.launch.job import JobSpec, LaunchConfig
from rlhf_pipeline.launch.stages import (
    PPOSettings,
    SFTSettings,
    run_ppo,
    run_reward_training,
    run_sft,
    run_stage,
    score_prior,
)

__all__ = ["JobSpec", "LaunchConfig", "PPOSettings", "SFTSettings", "run_ppo", "run_reward_training", "run_sft",
           "run_stage", "score_prior"]
