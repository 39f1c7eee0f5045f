"""Settings that would fail late (at the first ``generate``, in the PPO node) fail when their config is built,
and a run builds every stage's configs before its first node."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from kedro.framework.project import configure_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline

from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.hooks import SettingsCheckHook, check_settings
from rlhf_pipeline.launch.reward import RewardModelSettings
from rlhf_pipeline.pipeline_registry import register_pipelines
from rlhf_pipeline.pipelines.reward_model.nodes import train_reward_model_node
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.training.engine import child_environment
from tests.conftest import PROJECT_ROOT, make_project_copy
from tests.test_config import load_parameters

ENVIRONMENTS = ("local", "test", "gpu", "smollm2", "hh_rlhf")


def registered(name: str) -> Pipeline:
    """The registry's pipeline ``name`` (``__default__``: what ``kedro run`` runs)."""
    configure_project("rlhf_pipeline")
    return register_pipelines()[name]


def default_pipeline() -> Pipeline:
    return registered("__default__")


# --- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", 0, r"sampling.temperature must be > 0, got 0; for greedy decoding set do_sample: false"),
    ("temperature", -0.5, r"sampling.temperature must be > 0, got -0.5"),
    ("max_new_tokens", 0, r"sampling.max_new_tokens must be >= 1 .*got 0"),
    ("top_p", 0.0, r"sampling.top_p must be in \(0, 1\] .*got 0.0"),
    ("top_p", 1.5, r"sampling.top_p must be in \(0, 1\] .*got 1.5"),
    ("repetition_penalty", 0.0, r"sampling.repetition_penalty must be > 0 .*got 0.0"),
    ("batch_size", 0, r"sampling.batch_size must be null .* or >= 1, got 0"),
])
def test_sampling_settings_generate_would_reject_fail_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{field: value})
    with pytest.raises(ValueError, match=message):  # as a PPO preset's section, from YAML
        PPOConfig.from_params({"sampling": {field: value}})


def test_greedy_and_full_nucleus_sampling_are_valid():
    SamplingConfig(do_sample=False, max_new_tokens=1, top_p=1.0, batch_size=None)
    SamplingConfig(temperature=1e-3, repetition_penalty=1.1, batch_size=1)


# --- reward model -------------------------------------------------------------------------------------
def test_stats_sample_below_one_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"^reward_model.stats_sample must be an integer >= 1 .*got 0"):
        RewardModelSettings.from_params({"stats_sample": 0}, "reward_model", {})
    settings = RewardModelSettings.from_params({"stats_sample": 5, "epochs": 2, "launcher": {"num_processes": 2}},
                                               "evaluation.judge", {"num_processes": 8, "work_dir": "w"})
    assert settings.stats_sample == 5 and settings.train.epochs == 2
    assert settings.launch.num_processes == 2 and settings.launch.job_dir == "w/evaluation/judge/job"
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\]"):
        RewardModelSettings.from_params({"stats_sample": 5, "epoch": 2}, "reward_model", {})


def test_reward_model_node_rejects_stats_sample_before_training():
    pairs = pd.DataFrame({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]})
    # no model is needed: the settings fail before any is touched
    with pytest.raises(ValueError, match=r"reward_model.stats_sample must be an integer >= 1"):
        train_reward_model_node(None, pairs, pairs, {"stats_sample": 0}, {})


# --- the run's settings, built before its first node --------------------------------------------------
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_environments_settings_build(env):
    check_settings(load_parameters(PROJECT_ROOT / "conf", env), default_pipeline())


@pytest.mark.parametrize(("runtime_params", "message"), [
    ({"ppo": {"vanilla": {"sampling": {"temperature": 0}}}},
     r"parameters 'ppo.vanilla' \(parameters_ppo.yml .*\): sampling.temperature must be > 0, got 0"),
    ({"ppo": {"ppo_max": {"sampling": {"max_new_tokens": 0}}}},
     r"parameters 'ppo.ppo_max' .*: sampling.max_new_tokens must be >= 1"),
    ({"reward_model": {"stats_sample": 0}},
     r"parameters 'reward_model' \(parameters_reward_model.yml .*\): reward_model.stats_sample must be"),
    ({"evaluation": {"judge": {"stats_sample": 0}}}, r"evaluation.judge.stats_sample must be an integer >= 1"),
    ({"evaluation": {"sampling": {"top_p": 0}}}, r"parameters 'evaluation' .*: sampling.top_p must be in"),
    ({"sft": {"sampling": {"temperature": -1}}}, r"parameters 'sft' .*: sampling.temperature must be > 0"),
    ({"sft": {"epoch": 2}}, r"parameters 'sft' .*: SFTConfig: unknown parameter\(s\) \['epoch'\]"),
    ({"ppo": {"vanilla": {"launcher": {"processes": 2}}}}, r"'ppo.vanilla' .*LaunchConfig: unknown parameter"),
    ({"launcher": {"num_processes": 0}},
     r"parameters 'sft' \(the run's launcher in parameters.yml, or sft.launcher, .*launcher.num_processes must be >= 1"),
])
def test_a_bad_setting_of_any_stage_fails_the_run_before_its_first_node(runtime_params, message):
    catalog = DataCatalog(datasets={"parameters": MemoryDataset(
        load_parameters(PROJECT_ROOT / "conf", "test", runtime_params))})
    with pytest.raises(ValueError, match=message):
        SettingsCheckHook().before_pipeline_run({}, default_pipeline(), catalog)


def test_only_the_stages_a_run_includes_are_checked():
    parameters = load_parameters(PROJECT_ROOT / "conf", "test", {"ppo": {"vanilla": {"sampling": {"temperature": 0}}}})
    check_settings(parameters, registered("sft") + registered("reward_model"))
    with pytest.raises(ValueError, match="'ppo.vanilla'"):
        check_settings(parameters, registered("ppo"))
    with pytest.raises(ValueError, match="'ppo.vanilla'"):  # the split reads params:ppo for the buffer sizes
        check_settings(parameters, registered("data_processing"))


@pytest.mark.parametrize(("study", "runtime_params", "message"), [
    ("ablation", {"ablation": {"rows": {"no_kl": {"kl_coef": -1.0}}}}, r"parameters 'ablation' .*kl_coef"),
    ("ablation", {"ablation": {"rows": {"no_kl": {"preset": "ppo_maxx"}}}},
     r"ablation.rows.no_kl.preset: 'ppo_maxx'"),
    ("ablation", {"ppo": {"ppo_max": {"rollout_batch_size": 0}}}, r"parameters 'ppo.ppo_max' .*rollout_batch_size"),
    ("tuning", {"tuning": {"rows": {"clip_4": {"score_clip": -4.0}}}},
     r"parameters 'tuning' \(parameters_studies.yml .*score_clip"),
    ("long_run", {"long_run": {"iterations": -1}}, r"parameters 'long_run' .*iterations"),
])
def test_every_row_of_a_study_is_built_before_the_study_trains(study, runtime_params, message):
    parameters = load_parameters(PROJECT_ROOT / "conf", "test", runtime_params)
    with pytest.raises(ValueError, match=message):
        check_settings(parameters, registered(study))


def test_the_settings_check_is_registered():
    from rlhf_pipeline import settings

    assert any(isinstance(hook, SettingsCheckHook) for hook in settings.HOOKS)


@pytest.mark.slow
@pytest.mark.parametrize(("params", "message"), [
    ("ppo.vanilla.sampling.temperature=0", "sampling.temperature must be > 0"),
    ("data_processing.split.fractions.ppo_prompts=0.004", "split 'ppo_prompts' holds"),
])
def test_kedro_run_fails_before_sft_trains(tmp_path, params, message):
    project = make_project_copy(tmp_path)
    env = {**child_environment(), "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    process = subprocess.run([sys.executable, "-m", "kedro", "run", "--env", "test", "--params", params], cwd=project,
                             env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode != 0 and message in process.stdout + process.stderr
    assert not (project / "data/06_models/sft_model").exists()  # SFT never trained
    if (project / "mlflow.db").exists():  # no MLflow run recorded as a success (the settings check opens none)
        mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
        runs = mlflow.search_runs(search_all_experiments=True)
        assert runs.empty if "temperature" in params else runs["status"].tolist() == ["FAILED"]
