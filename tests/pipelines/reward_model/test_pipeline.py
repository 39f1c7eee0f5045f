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
