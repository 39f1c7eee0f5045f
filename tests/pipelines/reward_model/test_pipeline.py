"""The reward_model pipeline over an in-memory catalog: its metrics are those of the model it returns."""

import pytest

from rlhf_pipeline.pipelines.reward_model.pipeline import create_pipeline
from rlhf_pipeline.training.reward import score_responses
from tests.pipelines.conftest import parameters, run, tiny


def test_the_reported_accuracy_and_score_statistics_are_the_returned_models(tokenizer, pairs):
    rm_val = pairs.iloc[200:240].reset_index(drop=True)
    data = {"sft_model": tiny(tokenizer, 0), "rm_train": pairs.iloc[:200], "rm_val": rm_val}
    catalog = run(create_pipeline(), data, parameters({"reward_model": {"stats_sample": 50}}))
    model, metrics = catalog.load("reward_model"), catalog.load("reward_model_metrics")

    def scores(column):
        return score_responses(model.model, model.encoder(), rm_val["prompt"].tolist(), rm_val[column].tolist(), 96)

    chosen, rejected = scores("chosen"), scores("rejected")
    assert metrics["val_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert metrics["val_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert metrics["stats_count"] == 100.0 and metrics["train_pairs"] == 200
    assert catalog.load("reward_model_mlflow_metrics")["reward_model/reward_std"]["value"] == metrics["reward_std"]


def test_a_saved_reward_model_is_used_as_it_is_with_epochs_0_or_refused_without_one(tokenizer, pairs, tmp_path):
    rm_val = pairs.iloc[200:240].reset_index(drop=True)
    data = {"sft_model": tiny(tokenizer, 0), "rm_train": pairs.iloc[:100], "rm_val": rm_val}
    trained = run(create_pipeline(), data, parameters()).load("reward_model")
    trained.save_pretrained(str(tmp_path / "rm"))
    given = parameters({"reward_model": {"start_from": str(tmp_path / "rm"), "epochs": 0, "stats_sample": 20}})
    catalog = run(create_pipeline(), {**data, "sft_model": tiny(tokenizer, 1)}, given)
    model, metrics = catalog.load("reward_model"), catalog.load("reward_model_metrics")
    prompts, responses = rm_val["prompt"].tolist(), rm_val["chosen"].tolist()
    expected = score_responses(trained.model, trained.encoder(), prompts, responses, 96)
    assert score_responses(model.model, model.encoder(), prompts, responses, 96).allclose(expected, atol=1e-5)
    assert "train_loss" not in metrics and metrics["train_pairs"] == 100  # measured, not trained
    assert model.origin == str(tmp_path / "rm") and trained.origin is None
    with pytest.raises(ValueError, match=r"reward_model.epochs must be >= 1, or 0 with reward_model.start_from"):
        run(create_pipeline(), data, parameters({"reward_model": {"epochs": 0}}))
    with pytest.raises(ValueError, match=r"reward_model.start_from: .* is not a reward model this project saved"):
        run(create_pipeline(), data, parameters({"reward_model": {"start_from": str(tmp_path)}}))
