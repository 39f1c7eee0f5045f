"""The ppo pipeline over an in-memory catalog: every preset settings.py declares trains in its namespace, with
its work folders derived from the run's launcher setting."""

from kedro.framework.project import settings

from rlhf_pipeline.pipelines.ppo.pipeline import create_pipeline
from tests.pipelines.conftest import parameters, prompts_of, run, tiny


def test_each_preset_trains_its_iterations_and_checkpoints_under_the_work_folder(tokenizer, pairs, tmp_path):
    data = {"sft_model": tiny(tokenizer, 0), "reward_model": tiny(tokenizer, 1, True),
            "ppo_prompts": prompts_of(pairs.iloc[:150]),
            "sft_train": pairs.iloc[150:][["prompt", "chosen"]].rename(columns={"chosen": "response"}),
            "reward_model_metrics": {"reward_mean": 0.0, "reward_std": 1.0, "stats_count": 100.0}}
    params = parameters({"launcher": {"work_dir": str(tmp_path)}})
    catalog = run(create_pipeline(), data, params)
    variants = settings.DYNAMIC_PIPELINES_MAPPING["ppo"]
    for variant in variants:
        history = catalog.load(f"ppo.{variant}.history")
        assert history["step"].tolist() == [1, 2, 3]  # conf/test: iterations 3
        assert (tmp_path / "ppo" / variant / "checkpoints" / "latest").read_text() == "iteration_2"  # every 2nd
        assert catalog.load(f"ppo.{variant}.settings").train.kl_coef == params["ppo"][variant]["kl_coef"]
        final = catalog.load(f"ppo.{variant}.mlflow_metrics")
        assert final[f"ppo/{variant}/iterations"]["value"] == 3 and final[f"ppo/{variant}/stopped_early"]["value"] == 0
    ppo_max, vanilla = (catalog.load(f"ppo.{v}.history") for v in ("ppo_max", "vanilla"))
    assert ppo_max["loss/policy"].isna().tolist() == [True, False, False]  # one critic warm-up iteration
    assert "loss/ptx" in ppo_max and "loss/ptx" not in vanilla  # vanilla has no PPO-ptx term
