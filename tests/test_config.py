import pytest

from rlhf_pipeline.config import config_from
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.training.engine import OptimConfig


def test_unknown_parameter_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['kl_coeff'\]; valid: .*'kl_coef'"):
        config_from(PPOConfig, {"kl_coeff": 0.1})


def test_nested_configs_and_validation():
    cfg = config_from(PPOConfig, {"policy_optim": {"lr": 0.5, "betas": [0.8, 0.9]}}, policy_optim=OptimConfig)
    assert cfg.policy_optim.lr == 0.5 and cfg.policy_optim.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="score_clip clips normalised scores"):
        PPOConfig(score_reparam="scale")  # the default score_clip 0.8 cannot clip unnormalised scores
    with pytest.raises(ValueError, match="score_reparam: unknown 'normalize'"):
        PPOConfig(score_reparam="normalize")
    with pytest.raises(ValueError, match="entropy_target is the target"):
        PPOConfig(entropy_target=1.2)
    with pytest.raises(ValueError, match="critic_warmup_iterations must be in"):
        PPOConfig(iterations=3, critic_warmup_iterations=3)
    with pytest.raises(ValueError, match="multiple of"):
        PPOConfig(rollout_batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="alternatives; set one to null"):
        PPOConfig(micro_batch_size=4, micro_batch_tokens=256)


# --- the Kedro configuration layer: parameters merge softly -------------------------------------------
def load_parameters(conf_source, env: str, runtime_params: dict | None = None) -> dict:
    from kedro.config import OmegaConfigLoader

    from rlhf_pipeline import settings

    return OmegaConfigLoader(str(conf_source), env=env, runtime_params=runtime_params,
                             **settings.CONFIG_LOADER_ARGS)["parameters"]


def test_runtime_params_compose_with_an_environment():
    from tests.conftest import PROJECT_ROOT

    params = load_parameters(PROJECT_ROOT / "conf", "test", {"data_processing": {"strict": True},
                                                             "launcher": {"num_processes": 8}})
    assert params["data_processing"]["strict"] is True
    assert params["data_processing"]["split"]["seed"] == 0  # siblings of the overridden key survive
    assert params["data_processing"]["split"]["fractions"]["judge_train"] == 0.10
    assert params["launcher"] == {**params["launcher"], "num_processes": 8, "work_dir": "data/06_models"}
    assert params["ppo"]["ppo_max"]["iterations"] == 3 and params["ppo"]["ppo_max"]["kl_coef"] == 0.05  # env + base


def test_an_environment_states_only_what_differs(tmp_path):
    import shutil

    from tests.conftest import PROJECT_ROOT

    shutil.copytree(PROJECT_ROOT / "conf/base", tmp_path / "base")
    (tmp_path / "local").mkdir()
    (tmp_path / "local/parameters.yml").write_text("data_processing:\n  split: {max_pairs: 50}\n"
                                                   "launcher: {num_processes: 2}\n")
    params = load_parameters(tmp_path, "local")
    assert params["data_processing"]["split"] == {**params["data_processing"]["split"], "max_pairs": 50, "seed": 0}
    assert params["data_processing"]["strict"] is False and "fractions" in params["data_processing"]["split"]
    assert params["launcher"] == {"num_processes": 2, "hostfile": None, "master_port": None, "timeout_s": None,
                                  "work_dir": "data/06_models"}


def test_test_environment_shrinks_sizes_and_keeps_each_presets_tricks():
    from tests.conftest import PROJECT_ROOT

    ppo = load_parameters(PROJECT_ROOT / "conf", "test")["ppo"]
    for preset in ppo.values():
        assert preset["iterations"] == 3 and preset["sampling"] == {**preset["sampling"], "max_new_tokens": 12,
                                                                      "temperature": 0.8}
        cfg = PPOConfig.from_params({k: v for k, v in preset.items() if k != "launcher"})
        assert cfg.sampling.max_new_tokens == 12 and not cfg.lora.enabled  # every merged preset is a valid config
    assert ppo["ppo_max"]["score_clip"] == 2.0 and ppo["ppo_max"]["ptx_coef"] == 0.1  # the tuned values, kept
    assert ppo["ppo_max_paper"]["score_clip"] == 0.8 and ppo["ppo_max_paper"]["policy_optim"]["lr"] == 5.0e-5
    assert ppo["vanilla"]["kl_coef"] == 0.0 and ppo["vanilla"]["score_clip"] is None and "name" not in ppo["vanilla"]


def test_gpu_environment_is_real_lengths_with_lora_and_checkpointing():
    from tests.conftest import PROJECT_ROOT

    params = load_parameters(PROJECT_ROOT / "conf", "gpu")
    assert params["model"]["dtype"] == "bfloat16"
    for stage in (params["sft"], params["reward_model"], params["evaluation"]["judge"]):
        optim = config_from(OptimConfig, stage["optim"])
        assert optim.gradient_checkpointing and optim.bf16 == "auto" and optim.zero_stage == 2
    for preset in params["ppo"].values():
        cfg = PPOConfig.from_params({k: v for k, v in preset.items() if k != "launcher"})
        assert cfg.lora.r == 16 and cfg.policy_optim.gradient_checkpointing and cfg.critic_optim.gradient_checkpointing
        assert (cfg.max_prompt_length, cfg.sampling.max_new_tokens, cfg.sampling.temperature) == (512, 256, 0.8)
        assert cfg.rollout_batch_size == 128 and "name" not in preset
    assert params["ppo"]["vanilla"]["kl_coef"] == 0.0 and params["ppo"]["ppo_max"]["kl_coef"] == 0.05


def test_one_launcher_setting_with_per_stage_overrides_and_derived_work_folders():
    import socket

    from rlhf_pipeline.launch import LaunchConfig, PPOSettings
    from rlhf_pipeline.launch.job import free_port

    launcher = {"num_processes": 8, "hostfile": None, "master_port": None, "timeout_s": None, "work_dir": "runs/a"}
    sft = LaunchConfig.from_params(launcher, None, "sft")
    assert (sft.num_processes, sft.job_dir, sft.master_port) == (8, "runs/a/sft/job", None)
    assert LaunchConfig.from_params(launcher, {"num_processes": 2}, "sft").num_processes == 2  # the stage's key wins
    ppo = PPOSettings.from_params({"kl_coef": 0.1}, launcher, "ppo_max")
    assert (ppo.launch.job_dir, ppo.checkpoint_dir, ppo.trainer) == ("runs/a/ppo/ppo_max/job",
                                                                    "runs/a/ppo/ppo_max/checkpoints", "rlhf_pipeline")
    with pytest.raises(ValueError, match=r"LaunchConfig: unknown parameter\(s\) \['gpus'\]"):
        LaunchConfig.from_params(launcher, {"gpus": 2}, "sft")
    with pytest.raises(ValueError, match=r"trainer: 'trlx' is not one of"):
        PPOSettings.from_params({"trainer": "trlx"}, launcher, "x")
    with pytest.raises(ValueError, match=r"trainer: 'trl' trains in one process; x asks for 8 process"):
        PPOSettings.from_params({"trainer": "trl"}, launcher, "x")
    with pytest.raises(ValueError, match=r"launcher.job_dir: job folders are derived as <work_dir>/sft/job"):
        LaunchConfig.from_params(launcher, {"job_dir": "mine"}, "sft")
    with pytest.raises(ValueError, match=r"launcher.master_port: with a hostfile"):
        LaunchConfig.from_params(launcher, {"hostfile": "hosts"}, "sft")
    port = free_port()
    with socket.socket() as probe:  # free when found: a rendezvous can bind it
        probe.bind(("", port))
