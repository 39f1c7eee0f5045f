import pytest

from rlhf_pipeline.config import config_from
from rlhf_pipeline.rl.trainer import PPOConfig
from rlhf_pipeline.training.engine import OptimConfig


def test_unknown_parameter_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['kl_coeff'\]; valid: .*'kl_coef'"):
        config_from(PPOConfig, {"kl_coeff": 0.1})


def test_nested_configs_and_validation():
    cfg = config_from(PPOConfig, {"policy_optim": {"lr": 0.5, "betas": [0.8, 0.9]}}, policy_optim=OptimConfig)
    assert cfg.policy_optim.lr == 0.5 and cfg.policy_optim.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="alternatives"):
        PPOConfig(reward_normalisation=True, reward_scaling=True)
    with pytest.raises(ValueError, match="multiple of"):
        PPOConfig(rollout_batch_size=10, mini_batch_size=4)
