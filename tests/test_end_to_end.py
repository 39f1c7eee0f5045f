"""`kedro run --env test` stage by stage in a copy of the project: outputs, MLflow runs, kedro-viz."""

from __future__ import annotations

import json
import re
import sys

import mlflow
import pandas as pd
import pytest

from rlhf_pipeline import settings
from tests.browser import browser, free_port, rendered, serve
from tests.conftest import kedro
from tests.test_smollm2 import strict_json

pytestmark = pytest.mark.slow


def runs_of(project) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["rlhf_pipeline"], order_by=["attributes.start_time ASC"])


def artifacts_of(run_id: str, path: str = "") -> set[str]:
    return {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, path)}


def dataset_inputs(run_id: str) -> dict[str, str]:
    """The run's MLflow dataset inputs: name -> context."""
    inputs = mlflow.MlflowClient().get_run(run_id).inputs.dataset_inputs
    return {i.dataset.name: {t.key: t.value for t in i.tags}.get("mlflow.data.context") for i in inputs}


def model_version(name: str, version: str = "1"):
    return mlflow.MlflowClient().get_model_version(name, version)


def test_data_processing(project_copy):
    # --params composes with the environment (it once replaced the whole data_processing key)
    kedro(project_copy, "run", "--pipeline", "data_processing", "--env", "test", "--params", "data_processing.strict=true")
    raw_lines = (project_copy / "data/01_raw/synthetic_hh.jsonl").read_text().splitlines()
    assert len(raw_lines) == 400  # conf/test/catalog.yml: raw_preferences' task.num_pairs
    splits = {name: pd.read_parquet(project_copy / f"data/05_model_input/{name}.parquet")
              for name in ("sft_train", "rm_train", "rm_val", "ppo_prompts", "eval_prompts", "judge_train")}
    assert all(len(frame) for frame in splits.values())
    assert not set(splits["eval_prompts"]["prompt"]) & set().union(*(set(f["prompt"]) for n, f in splits.items() if n != "eval_prompts"))
    run = runs_of(project_copy).iloc[-1]
    assert run["metrics.data/preferences_valid"] == 400 and run["metrics.data/preferences_quarantined"] == 0
    assert run["metrics.data/eval_prompts_size"] == len(splits["eval_prompts"])
    # the embedded task's file records the catalog settings it was generated from
    task = json.loads((project_copy / "data/01_raw/synthetic_hh.jsonl.task.json").read_text())
    assert (task["num_pairs"], task["seed"]) == (400, 0)
    assert run["params.data_processing.strict"] == "True"
    # what the split read: the pairs (stage_rows is empty, no stage having a source of its own: an empty frame
    # carries nothing to trace, and the lineage hook logs none)
    assert dataset_inputs(run["run_id"]) == {"preferences": "source"}


def test_sft(project_copy):
    kedro(project_copy, "run", "--pipeline", "sft", "--env", "test")
    metrics = json.loads((project_copy / "data/08_reporting/sft_metrics.json").read_text())
    assert 0 < metrics["val_loss"] < metrics["val_loss_before"] and metrics["train_examples"] > 0
    [version] = list((project_copy / "data/06_models/sft_model").iterdir())
    assert (version / "sft_model" / "model.safetensors").exists()
    run = runs_of(project_copy).iloc[-1]
    history = mlflow.MlflowClient().get_metric_history(run["run_id"], "sft/train/loss")
    assert len(history) > 3 and history[-1].value < history[0].value
    assert dataset_inputs(run["run_id"]) == {"sft_train": "training", "rm_train": "training"}  # rm_train: tokenizer corpus
    registered = model_version("rlhf-sft")  # logged as an MLflow model, tagged with its catalog version and run
    assert registered.tags["kedro.catalog_version"] == version.name and registered.run_id == run["run_id"]
    assert run["tags.output_model.sft_model"] == "rlhf-sft/1"


def test_reward_model(project_copy):
    kedro(project_copy, "run", "--pipeline", "reward_model", "--env", "test")
    metrics = json.loads((project_copy / "data/08_reporting/reward_model_metrics.json").read_text())
    assert {"val_accuracy", "gold_agreement", "reward_mean", "reward_std"} <= set(metrics) and metrics["reward_std"] > 0
    run = runs_of(project_copy).iloc[-1]
    assert run["metrics.reward_model/val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert "reporting/reward_model_metrics.json" in artifacts_of(run["run_id"], "reporting")
    assert dataset_inputs(run["run_id"]) == {"rm_train": "training", "rm_val": "validation"}
    # a later stage-by-stage run finds the SFT version it started from, and the RM names it as its parent
    assert run["tags.input_model.sft_model"] == "rlhf-sft/1"
    assert model_version("rlhf-reward").tags["parent.sft_model"] == "rlhf-sft/1"
    # the registered value-head model scores rm_val as the stage measured it
    scorer = mlflow.pyfunc.load_model("models:/rlhf-reward/1")
    pairs = pd.read_parquet(project_copy / "data/05_model_input/rm_val.parquet")
    chosen, rejected = (scorer.predict(pairs.rename(columns={column: "response"})[["prompt", "response"]])
                        for column in ("chosen", "rejected"))
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    assert metrics["val_accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)


def test_kedro_viz_build_lists_nodes_and_datasets(project_copy):
    kedro(project_copy, "viz", "build")
    graph = json.loads((project_copy / "build/api/main").read_text())
    names = {node["name"] for node in graph["nodes"]}
    assert {"parse_sources_node", "split_preferences_node", "train_sft_model_node", "train_reward_model_node",
            "train_ppo_node", "train_judge_model_node", "select_champion_node"} <= names
    assert {"raw_preferences", "eval_prompts", "sft_model", "reward_model_metrics", "champion"} <= names
    assert "data_processing" in {p["id"] for p in graph["pipelines"]}


def test_ppo_both_variants(project_copy):
    kedro(project_copy, "run", "--pipeline", "ppo", "--env", "test")
    run = runs_of(project_copy).iloc[-1]
    client = mlflow.MlflowClient()
    for variant in ("ppo_max", "vanilla"):
        history = pd.read_csv(project_copy / f"data/08_reporting/ppo_{variant}_history.csv")
        assert history["step"].tolist() == [1, 2, 3]
        [version] = list((project_copy / f"data/06_models/ppo/{variant}/policy").iterdir())
        assert (version / "policy" / "model.safetensors").exists()
        assert (project_copy / f"data/06_models/ppo/{variant}/checkpoints/latest").read_text() == "iteration_2"
        curve = client.get_metric_history(run["run_id"], f"ppo/{variant}/kl/sequence")
        assert [m.step for m in curve] == [1, 2, 3] and run[f"metrics.ppo/{variant}/iterations"] == 3
        assert f"ppo_{variant}/ppo_{variant}_samples.json" in artifacts_of(run["run_id"], f"ppo_{variant}")
    versions = {v.tags["variant"]: v for v in client.search_model_versions("name = 'rlhf-policy'")}
    assert set(versions) == {"ppo_max", "vanilla"}
    for version in versions.values():
        assert version.tags["parent.sft_model"] == "rlhf-sft/1" and version.tags["parent.reward_model"] == "rlhf-reward/1"
    assert dataset_inputs(run["run_id"]) == {"ppo_prompts": "training", "sft_train": "training"}
    ppo_max = pd.read_csv(project_copy / "data/08_reporting/ppo_ppo_max_history.csv")
    assert "loss/ptx" in ppo_max.columns and "loss/policy" in ppo_max.columns  # policy trains after 1 warm-up step
    assert ppo_max["loss/policy"].isna().tolist() == [True, False, False]


def test_evaluation(project_copy):
    kedro(project_copy, "run", "--pipeline", "evaluation", "--env", "test")
    reporting = project_copy / "data/08_reporting"
    summary = strict_json(reporting / "evaluation_summary.json")
    assert set(summary) == {"sft", "ppo_max", "vanilla"}
    keys = {"gold_score", "rm_score", "judge_score", "win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "win_rate_vs_sft_judge",
            "judge_gold_correlation", "kl_to_sft", "perplexity", "response_length"}
    for policy in summary.values():
        assert keys <= set(policy) and isinstance(policy["gold_score"], float) and isinstance(policy["judge_score"], float)
    judge = strict_json(reporting / "judge_metrics.json")  # the judge trained on judge_train, measured on rm_val
    assert judge["train_pairs"] == len(pd.read_parquet(project_copy / "data/05_model_input/judge_train.parquet"))
    assert judge["val_pairs"] == len(pd.read_parquet(project_copy / "data/05_model_input/rm_val.parquet"))
    for name in ("sft_metrics.json", "reward_model_metrics.json"):
        strict_json(reporting / name)
    assert summary["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)
    samples = pd.read_json(reporting / "evaluation_samples.jsonl", lines=True)
    for policy, row in summary.items():  # the summary's means are those of the sampled responses' scores
        assert row["judge_score"] == pytest.approx(samples.loc[samples["policy"] == policy, "judge_score"].mean())
    for name in ("evaluation_summary.md", "evaluation_summary.csv", "training_curves.png", "comparison.png"):
        assert (project_copy / "data/08_reporting" / name).stat().st_size > 0
    run = runs_of(project_copy).iloc[-1]
    assert "metrics.evaluation/ppo_max/gold_score" in run.index
    assert {"reporting/training_curves.png", "reporting/comparison.png", "reporting/evaluation_summary.json"} <= \
        artifacts_of(run["run_id"], "reporting")
    assert dataset_inputs(run["run_id"]) == {"eval_prompts": "evaluation", "judge_train": "training", "rm_val": "validation"}
    # the policy with the best gold score is the registry's champion, and it loads back from MLflow and generates
    chosen = strict_json(reporting / "champion.json")  # select_champion_node's choice, which sets the alias
    best = max(("ppo_max", "vanilla"), key=lambda name: summary[name]["gold_score"])
    assert chosen == {"policy": best, "by": "gold_score", "value": summary[best]["gold_score"]}
    champion = mlflow.MlflowClient().get_model_version_by_alias("rlhf-policy", "champion")
    assert champion.tags["variant"] == best and run["tags.champion"].startswith(f"rlhf-policy/{champion.version} ({best}")
    generator = mlflow.transformers.load_model("models:/rlhf-policy@champion")
    text = generator("\n\nHuman: What is 2 plus 3?\n\nAssistant:", max_new_tokens=8)[0]["generated_text"]
    assert text.startswith("\n\nHuman: What is 2 plus 3?") and len(text) > len("\n\nHuman: What is 2 plus 3?\n\nAssistant:")


def test_notebook_reads_the_last_run(project_copy, monkeypatch):
    import nbclient
    import nbformat

    from tests.conftest import PROJECT_ROOT

    monkeypatch.setenv("RLHF_PROJECT_DIR", str(project_copy))
    notebook = nbformat.read(PROJECT_ROOT / "notebooks/ppo_comparison.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(project_copy)}}).execute()
    table_output = notebook.cells[2].outputs[0]["data"]["text/plain"]
    assert "ppo_max" in table_output and "vanilla" in table_output and "gold_score" in table_output
    curves = notebook.cells[3].outputs
    assert any("image/png" in o.get("data", {}) for o in curves)
    points = int(next(o["text"] for o in curves if o.get("name") == "stdout").split()[0])
    assert points == 3 * 2 * 3  # 3 curves x 2 variants x 3 iterations (conf/test)


@pytest.mark.skipif(browser() is None, reason="no headless Chromium here (Debian: apt-get install chromium)")
def test_mlflow_and_kedro_viz_show_the_lineage_in_a_browser(project_copy):
    """What a person sees: the MLflow UI over the project's store and the kedro-viz site, rendered by Chromium."""
    run = runs_of(project_copy).iloc[-1]  # the evaluation run
    mlflow_port, viz_port = free_port(), free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    servers = [serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                      f"sqlite:///{project_copy / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(mlflow_port)],
                     project_copy, mlflow_url)]
    try:
        models = rendered(f"{mlflow_url}/#/models")
        assert {"rlhf-sft", "rlhf-reward", "rlhf-judge", "rlhf-policy"} <= set(re.findall(r"rlhf-[a-z]+", models))
        page = rendered(f"{mlflow_url}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}")
        # the run's dataset inputs: the panel names the first and counts the others ("+2")
        assert any(name in page for name in ("eval_prompts", "judge_train", "rm_val"))
        assert "champion" in page and "input_model.ppo.ppo_max.policy" in page  # its lineage tags
        assert "Registered models" in page and "rlhf-policy" in page
        charts = rendered(f"{mlflow_url}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}/model-metrics")
        assert ">evaluation/ppo_max<" in charts and ">judge/train<" in charts  # its metric chart sections
        # kedro-viz: the static site `kedro viz build` wrote (test_kedro_viz_build_lists_nodes_and_datasets)
        servers.append(serve([sys.executable, "-m", "http.server", str(viz_port), "--bind", "127.0.0.1"],
                             project_copy / "build", f"http://127.0.0.1:{viz_port}/"))
        viz = rendered(f"http://127.0.0.1:{viz_port}/")
        for name in ("prepare_base_model_node", "train_sft_model_node", "train_reward_model_node", "ppo.ppo_max.policy",
                     "summarise_evaluation_node", "eval_prompts", "sft_model", "reward_model"):
            assert name in viz, name
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def test_ablation_study(project_copy):
    """`kedro run --pipeline ablation --env test`: every declared row x seed from the SFT model, RM and judge the
    earlier stages saved; a rerun with --only-missing-outputs reads every stored (row, seed) back."""
    kedro(project_copy, "run", "--pipeline", "ablation", "--env", "test")
    reporting = project_copy / "data/08_reporting/ablation"
    summary = pd.read_csv(reporting / "summary.csv").set_index("variant")
    rows, seeds = settings.STUDIES["ablation"].rows, settings.STUDIES["ablation"].seeds
    assert summary.index.tolist() == rows and (summary["seeds"] == len(seeds)).all()
    runs, curves = pd.read_csv(reporting / "runs.csv"), pd.read_csv(reporting / "curves.csv")
    for variant in rows:
        own = runs[runs["variant"] == variant]
        assert own["seed"].tolist() == seeds
        assert ((own["win_rate_vs_sft_gold_low"] <= own["win_rate_vs_sft_gold"])
                & (own["win_rate_vs_sft_gold"] <= own["win_rate_vs_sft_gold_high"])).all()
        assert summary.loc[variant, "gold_score"] == pytest.approx(own["gold_score"].mean())
        steps = curves[curves["variant"] == variant].groupby("seed")["step"].apply(list).tolist()
        assert steps == [[1, 2]] * len(seeds)  # conf/test: ablation.iterations 2
    assert curves["kl/sequence"].notna().all() and curves["reward/raw_score"].notna().all()
    scored = curves.loc[curves["variant"] != "trl_ppo", ["gold_score", "judge_score"]]
    assert scored.notna().all().all()  # every rollout scored (TRL's trainer keeps none)
    assert (runs.loc[runs["variant"] == "no_kl", "kl_to_sft"].abs() > 0).all()  # the policies moved away from SFT
    assert runs.loc[runs["variant"] == "ppo_max", "kl_to_sft"].nunique() == len(seeds)  # and the seeds differ
    table = (reporting / "summary.md").read_text()
    assert all(f"| {variant} | {len(seeds)} | " in table for variant in rows) and "Welch interval" in table
    for name in ("training_curves.png", "gold_score.png", "frontier.png"):
        assert (reporting / name).stat().st_size > 10_000
    # one MLflow run for the study: each (row, seed)'s curves under its name, each row's means, the tables
    study = runs_of(project_copy).iloc[-1]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(study["run_id"], "ppo/ablation/no_kl/seed_1/kl/sequence")] == [1, 2]
    assert study["metrics.ablation/no_kl/kl_to_sft"] == pytest.approx(summary.loc["no_kl", "kl_to_sft"])
    assert {"ablation/summary.csv", "ablation/training_curves.png", "ablation/gold_score.png"} <= \
        artifacts_of(study["run_id"], "ablation")
    stored = {path: path.stat().st_mtime_ns for path in (project_copy / "data/07_model_output/ablation").glob("*/*/result.json")}
    assert len(stored) == len(rows) * len(seeds)
    kedro(project_copy, "run", "--pipeline", "ablation", "--env", "test", "--only-missing-outputs")
    assert {path: path.stat().st_mtime_ns for path in stored} == stored  # read back, not trained again
    assert pd.read_csv(reporting / "summary.csv").equals(summary.reset_index())
    # the summary alone, over what is stored: a (row, seed) not stored is named, not a failure
    (project_copy / "data/07_model_output/ablation/no_kl/seed_2/result.json").unlink()
    kedro(project_copy, "run", "--pipeline", "ablation", "--env", "test", "--nodes", "summarise_ablation_node")
    assert (reporting / "summary.md").read_text().endswith("Not stored yet (left out): no_kl.seed_2.\n")
    assert pd.read_csv(reporting / "summary.csv").set_index("variant").loc["no_kl", "seeds"] == len(seeds) - 1
