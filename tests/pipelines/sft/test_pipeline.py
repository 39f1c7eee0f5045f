"""The sft pipeline over an in-memory catalog: the tiny base model built on the corpus, fine-tuned, measured."""

from rlhf_pipeline.pipelines.sft.pipeline import create_pipeline
from tests.pipelines.conftest import parameters, run


def test_sft_lowers_the_held_out_loss_and_reports_it_to_mlflow(pairs):
    data = {"sft_train": pairs.iloc[:240][["prompt", "chosen"]].rename(columns={"chosen": "response"}),
            "rm_train": pairs.iloc[240:]}
    catalog = run(create_pipeline(), data, parameters({"sft": {"epochs": 2}}))
    metrics, model = catalog.load("sft_metrics"), catalog.load("sft_model")
    assert metrics["val_loss"] < metrics["val_loss_before"] - 0.5  # 6.2 -> ~5.3 at these sizes
    assert metrics["train_examples"] + metrics["val_examples"] == 240 and metrics["world_size"] == 1
    assert metrics["device"] == next(model.model.parameters()).device.type
    assert catalog.load("sft_mlflow_metrics")["sft/val_loss"] == {"value": metrics["val_loss"], "step": 0}
    assert catalog.load("base_model").tokenizer.vocab_size == model.tokenizer.vocab_size == 512  # conf/test


def test_epochs_0_keeps_the_base_model_as_the_sft_model(pairs):
    data = {"sft_train": pairs.iloc[:60][["prompt", "chosen"]].rename(columns={"chosen": "response"}),
            "rm_train": pairs.iloc[60:120]}
    catalog = run(create_pipeline(), data, parameters({"sft": {"epochs": 0}}))
    base, model, metrics = catalog.load("base_model"), catalog.load("sft_model"), catalog.load("sft_metrics")
    base_weights, weights = base.model.state_dict(), model.model.state_dict()
    assert all(base_weights[name].equal(weights[name]) for name in base_weights)
    assert "val_loss" not in metrics and metrics["gold_score_after"] == metrics["gold_score_before"]
