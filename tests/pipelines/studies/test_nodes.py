"""The studies: rows composed from presets, a small study run over an in-memory catalog (the ppo pipeline's
training node and the evaluation's nodes per row and seed), resuming from stored results, refusing stale ones,
summarising part of a grid, the summary's intervals and marks, the rollout curves, and TRL scoring with our reward
model."""

import math

import pandas as pd
import pytest
import torch
from kedro.framework.project import settings
from kedro_datasets.json import JSONDataset

from rlhf_pipeline.baselines.trl_ppo import TRLScoreModel
from rlhf_pipeline.datasets import StoredResultDataset
from rlhf_pipeline.evaluation import rollout_curves
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.modeling import TinyModelConfig, ValueHeadModel, build_tiny_model, train_tokenizer
from rlhf_pipeline.pipeline_registry import register_pipelines
from rlhf_pipeline.pipelines.evaluation.pipeline import policy_evaluation, prompt_set
from rlhf_pipeline.pipelines.ppo.pipeline import training
from rlhf_pipeline.pipelines.studies.nodes import check_study, row_parameters, summarise_study
from rlhf_pipeline.pipelines.studies.pipeline import create_pipeline
from rlhf_pipeline.reporting import findings_markdown, summary_markdown, summary_table
from rlhf_pipeline.training.reward import score_responses
from tests.pipelines.conftest import parameters, prompts_of, run, tiny

PPO = {
    "ppo_max": {"launcher": {"num_processes": 1}, "iterations": 80, "rollout_batch_size": 8,
                "kl_coef": 0.2, "sampling": {"max_new_tokens": 48, "temperature": 0.8}},
    "vanilla": {"iterations": 80, "rollout_batch_size": 8, "kl_coef": 0.0,
                "sampling": {"max_new_tokens": 48, "temperature": 0.8}},
}
ABLATION = {"base": "ppo_max", "iterations": 40, "level": 0.95, "bootstrap_resamples": 100, "window": 0.1,
            "rows": {"ppo_max": {}, "hot": {"sampling": {"temperature": 1.0}}, "vanilla": {"preset": "vanilla"},
                     "typo": {"preset": "ppo_maxx"}}}


def test_a_row_is_its_preset_with_the_rows_overrides_and_the_studys_budget():
    params = row_parameters(PPO, ABLATION, "ablation", "hot", 2)
    assert params["sampling"] == {"max_new_tokens": 48, "temperature": 1.0}  # nested keys merge, not replace
    assert params["kl_coef"] == 0.2 and params["iterations"] == 40 and params["seed"] == 2
    assert params["launcher"] == {"num_processes": 1}
    assert params["sample_every"] == 1 and params["sample_count"] == 8  # every rollout, for the gold curve
    vanilla = row_parameters(PPO, {**ABLATION, "iterations": None}, "ablation", "vanilla", 0)
    assert vanilla["kl_coef"] == 0.0 and vanilla["iterations"] == 80
    with pytest.raises(ValueError, match=r"ablation.rows.typo.preset: 'ppo_maxx'"):
        row_parameters(PPO, ABLATION, "ablation", "typo", 0)
    with pytest.raises(ValueError, match=r"tuning.rows: no row 'cold'"):
        row_parameters(PPO, ABLATION, "tuning", "cold", 0)
    with pytest.raises(ValueError, match=r"ablation: unknown key\(s\) \['grid', 'seeds'\].*STUDIES\['ablation'\]"):
        row_parameters(PPO, {**ABLATION, "grid": ["hot"], "seeds": [0]}, "ablation", "hot", 0)
    with pytest.raises(ValueError, match=r"ablation.window must be in \(0, 1\]"):
        row_parameters(PPO, {**ABLATION, "window": 1.5}, "ablation", "hot", 0)
    check_study(ABLATION, "ablation", ["ppo_max", "hot", "vanilla", "typo"])
    with pytest.raises(ValueError, match=r"ablation.rows: \['typo', 'vanilla'\] not declared in settings.py"):
        check_study(ABLATION, "ablation", ["ppo_max", "hot"])  # defined but never run
    with pytest.raises(ValueError, match=r"ablation.rows: no row 'cold'"):
        check_study(ABLATION, "ablation", ["ppo_max", "hot", "vanilla", "typo", "cold"])
    with pytest.raises(ValueError, match=r"ablation.base: 'hot' must be one of the study's rows"):
        check_study({**ABLATION, "base": "hot", "rows": {"vanilla": {}}}, "ablation", ["vanilla"])
    with pytest.raises(ValueError, match=r"ablation.level must be in \(0, 1\], got 95"):
        check_study({**ABLATION, "level": 95}, "ablation")
    with pytest.raises(ValueError, match=r"ablation.bootstrap_resamples must be >= 1, got 0"):
        check_study({**ABLATION, "bootstrap_resamples": 0}, "ablation")
    with pytest.raises(ValueError, match=r"ablation.evaluation: unknown key\(s\) \['max_prompt'\]"):
        check_study({**ABLATION, "evaluation": {"max_prompt": 8}}, "ablation", evaluation={"max_prompts": 200})


def test_each_study_instantiates_the_ppo_and_evaluation_nodes_per_row_and_seed_on_its_prompts():
    pipelines = register_pipelines()
    for name, declared in settings.STUDIES.items():
        assert {"sft_model", "reward_model", "judge_model", declared.prompts} <= pipelines[name].inputs()
        assert {f"params:{name}", f"{name}.baseline.scores", *(f"{name}.{row}.seed_{seed}.result" for row in
                declared.rows for seed in declared.seeds)} <= pipelines[name].all_outputs() | pipelines[name].inputs()
    assert "eval_prompts" not in pipelines["tuning"].inputs()  # tuning never reads the evaluation's prompts
    study = {node.name for node in pipelines["ablation"].nodes}
    rows, seeds = settings.STUDIES["ablation"].rows, settings.STUDIES["ablation"].seeds
    for row in rows:
        for seed in seeds:
            assert {f"ablation.{row}.seed_{seed}.{name}" for name in (
                "row_settings_node", "train_ppo_node", "sample_and_score_node", "compare_with_sft_node",
                "row_result_node")} <= study
    assert pipelines["ablation"].only_nodes("ablation.no_kl.seed_1.train_ppo_node").nodes[0].func is \
        pipelines["ppo"].only_nodes("ppo.ppo_max.train_ppo_node").nodes[0].func  # the same node, not a copy
    order = [n.name for n in pipelines["ablation"].nodes]  # the order SequentialRunner runs them in
    runs = [f"ablation.{row}.seed_{seed}" for row in rows for seed in seeds]
    for earlier, later in zip(runs, runs[1:], strict=False):  # one (row, seed) stored before the next trains: one policy in memory
        assert order.index(f"{earlier}.row_result_node") < order.index(f"{later}.train_ppo_node")
    assert not any(n.name.startswith(tuple(settings.STUDIES)) for n in pipelines["__default__"].nodes)
    assert set(pipelines["__default__"].nodes) == set().union(*(set(p.nodes) for name, p in pipelines.items()
                                                                 if name != "__default__" and name not in settings.STUDIES))


@pytest.fixture(scope="module")
def study(tokenizer, pairs, tmp_path_factory):
    """Two rows x one seed at two iterations, results stored as JSON files (the catalog's result cache)."""
    folder = tmp_path_factory.mktemp("ablation")
    pipeline = create_pipeline("ablation", ["ppo_max", "no_kl"], [0], "eval_prompts", training(), policy_evaluation(),
                               prompt_set("params:ablation.evaluation"))
    params = parameters({"launcher": {"work_dir": str(folder / "work")}})
    data = {"sft_model": tiny(tokenizer, 0), "reward_model": tiny(tokenizer, 1, True), "judge_model": tiny(tokenizer, 2, True),
            "ppo_prompts": prompts_of(pairs.iloc[:150]), "sft_train": pairs.iloc[150:].rename(columns={"chosen": "response"}),
            "reward_model_metrics": {"reward_mean": 0.0, "reward_std": 1.0, "stats_count": 100.0},
            "eval_prompts": prompts_of(pairs.iloc[200:])}

    def files():
        return {f"ablation.{row}.seed_0.result": StoredResultDataset(filepath=str(folder / row / "result.json"))
                for row in ("ppo_max", "no_kl")}

    return pipeline, data, params, files, folder, run(pipeline, data, params, files())


def test_each_row_and_seed_is_trained_evaluated_and_stored(study):
    _, _, params, _, folder, catalog = study
    runs, curves, summary = (catalog.load(name) for name in ("ablation.runs", "ablation.curves", "ablation.summary"))
    assert runs["variant"].tolist() == ["ppo_max", "no_kl"] and runs["seed"].tolist() == [0, 0]
    assert curves.groupby("variant", sort=False)["step"].apply(list).tolist() == [[1, 2], [1, 2]]
    assert curves["gold_score"].notna().all() and curves["judge_score"].notna().all()  # every rollout scored
    assert ((runs["win_rate_vs_sft_gold_low"] <= runs["win_rate_vs_sft_gold"])
            & (runs["win_rate_vs_sft_gold"] <= runs["win_rate_vs_sft_gold_high"])).all()
    assert summary.set_index("variant").loc["no_kl", "gold_score"] == pytest.approx(runs.iloc[1]["gold_score"])
    assert (folder / "no_kl" / "result.json").exists()
    no_kl = catalog.load("ablation.no_kl.seed_0.settings")
    assert no_kl.train.kl_coef == 0.0 and no_kl.train.iterations == params["ablation"]["iterations"] == 2
    assert no_kl.checkpoint_dir.startswith(str(folder / "work" / "ablation" / "no_kl" / "seed_0"))
    assert "| no_kl | 1 | " in catalog.load("ablation.markdown")


def test_a_rerun_with_only_missing_outputs_reads_the_stored_results(study):
    pipeline, data, params, files, folder, first = study
    stored = {row: (folder / row / "result.json").stat().st_mtime_ns for row in ("ppo_max", "no_kl")}
    # in a `kedro run` the summary's MLflow metrics are missing from the new run: the summary always reruns
    summary = {"ablation_mlflow_metrics": JSONDataset(filepath=str(folder / "again.json"))}
    again = run(pipeline, data, params, {**files(), **summary}, only_missing_outputs=True)
    assert {row: (folder / row / "result.json").stat().st_mtime_ns for row in stored} == stored
    assert again.load("ablation.summary").equals(first.load("ablation.summary"))
    changed = parameters({"launcher": {"work_dir": str(folder / "work")},
                          "ablation": {"rows": {"no_kl": {"kl_coef": 0.0, "clip_eps": 0.3}}}})
    summary = {"ablation_mlflow_metrics": JSONDataset(filepath=str(folder / "changed.json"))}
    with pytest.raises(Exception, match=r"results from other settings or models: ablation.no_kl.seed_0.result"):
        run(pipeline, data, changed, {**files(), **summary}, only_missing_outputs=True)


def runs():
    return pd.DataFrame([
        {"variant": "ppo_max", "seed": 0, "gold_score": -0.5, "kl_to_sft": 0.5},
        {"variant": "ppo_max", "seed": 1, "gold_score": -0.6, "kl_to_sft": 0.6},
        {"variant": "ppo_max", "seed": 2, "gold_score": -0.4, "kl_to_sft": 0.4},
        {"variant": "no_kl", "seed": 0, "gold_score": -2.0, "kl_to_sft": 9.0},
        {"variant": "no_kl", "seed": 1, "gold_score": -2.2, "kl_to_sft": 11.0},
        {"variant": "no_kl", "seed": 2, "gold_score": -1.8, "kl_to_sft": 10.0},
    ])


def test_summary_gives_intervals_across_seeds_and_marks_differences_beyond_them():
    summary = summary_table(runs(), "ppo_max", 0.95).set_index("variant")
    half = 4.302653 * 0.1 / math.sqrt(3)  # sd 0.1 over 3 seeds, t(0.975, 2)
    assert summary.loc["ppo_max", "gold_score"] == pytest.approx(-0.5)
    assert summary.loc["ppo_max", "gold_score_high"] - summary.loc["ppo_max", "gold_score"] == pytest.approx(half)
    assert summary.loc["no_kl", "gold_score_vs_ppo_max"] == pytest.approx(-1.5)
    assert summary.loc["no_kl", "gold_score_vs_ppo_max_differs"] and not summary.loc["ppo_max", "gold_score_vs_ppo_max_differs"]
    assert summary.loc["no_kl", "seeds"] == 3
    assert "seeds_beating_sft_gold" not in summary  # without bootstrap intervals, nothing to count
    shares = summary_table(runs().assign(win_rate_vs_sft_gold=[0.9, 0.99, 0.6, 0.1, 0.0, 0.05]), "ppo_max", 0.95)
    assert shares["win_rate_vs_sft_gold_high"].tolist() == [1.0, pytest.approx(0.05 + 4.302653 * 0.05 / math.sqrt(3))]
    assert shares["win_rate_vs_sft_gold_low"].tolist()[1] == 0.0  # a rate's interval stays inside [0, 1]
    with_intervals = runs().assign(win_rate_vs_sft_gold_low=[0.52, 0.49, 0.6, 0.1, 0.2, 0.3])
    counted = summary_table(with_intervals, "ppo_max", 0.95).set_index("variant")["seeds_beating_sft_gold"]
    assert counted.to_dict() == {"ppo_max": 2, "no_kl": 0}
    text = summary_markdown(summary_table(with_intervals, "ppo_max", 0.95), "ppo_max", 0.95)
    assert next(line for line in text.splitlines() if line.startswith("| ppo_max |")).endswith("| 2/3 |")
    text = summary_markdown(summary.reset_index(), "ppo_max", 0.95)
    assert "| no_kl | 3 | -2.000 [-2.497, -1.503] ▼ |" in text  # -2 ± 4.302653·0.2/√3
    assert "| ppo_max | 3 | -0.500 [-0.748, -0.252] |" in text


def test_findings_name_the_best_row_the_rows_beyond_the_interval_and_those_that_hold_or_collapse():
    one_seed = pd.DataFrame([{"variant": "vanilla", "seed": 0, "gold_score": -3.0, "kl_to_sft": 90.0}])
    summary = summary_table(pd.concat([runs(), one_seed]), "ppo_max", 0.95)
    stability = pd.DataFrame([{"variant": "ppo_max", "seeds": 3, "seeds_holding": 3},
                              {"variant": "no_kl", "seeds": 3, "seeds_holding": 0},
                              {"variant": "vanilla", "seeds": 1, "seeds_holding": 0}])
    lines = findings_markdown(summary, stability, "ppo_max", 0.95).splitlines()
    assert lines == [
        "- Highest mean gold score: `ppo_max` (3 seeds), -0.500 [-0.748, -0.252].",  # -0.5 ± 4.302653·0.1/√3
        # no_kl: -1.5, its Welch interval excludes 0; vanilla: one seed, no interval
        "- Gold score above `ppo_max`'s beyond the 95% Welch interval of the difference: none; below it: `no_kl`; "
        "every other row is within the interval or has one seed.",
        "- Holding the peak gold to the end in every seed: `ppo_max`; collapsing in every seed: `no_kl`, `vanilla`.",
    ]
    alone = findings_markdown(summary_table(one_seed, "vanilla", 0.95), stability.iloc[:0], "vanilla", 0.95)
    assert alone.splitlines()[0] == "- Highest mean gold score: `vanilla` (1 seed), -3.000."  # no interval
    assert findings_markdown(summary.drop(columns="gold_score"), stability.iloc[:0], "ppo_max", 0.95) == ""


def test_summary_refuses_a_result_stored_from_other_settings_and_names_those_not_stored(study):
    *_, params, _, _, catalog = study
    result = catalog.load("ablation.no_kl.seed_0.result")
    evaluation, ablation = params["evaluation"], params["ablation"]
    sft_scores = catalog.load("ablation.baseline.scores")
    fixed = {"sft_metrics": {"gold_score": -1.0}, "ppo": params["ppo"], "launcher": params["launcher"], "study": "ablation"}
    out = summarise_study(ablation, evaluation, sft_scores, **fixed, result__no_kl__seed_0=result,
                          result__ppo_max__seed_0=None)
    assert out["runs"]["variant"].tolist() == ["no_kl"]
    assert out["markdown"].endswith("Not stored yet (left out): ppo_max.seed_0.\n")
    with pytest.raises(ValueError, match=r"ablation: no \(row, seed\) result is stored yet"):
        summarise_study(ablation, evaluation, sft_scores, **fixed, result__no_kl__seed_0=None)
    for changed in ({"evaluation": {**evaluation, "max_prompts": 3}}, {"parameters": {**ablation, "level": 0.9}},
                    {"parameters": {**ablation, "rows": {**ablation["rows"], "no_kl": {"kl_coef": 0.01}}}},
                    {"sft_scores": {**sft_scores, "responses": ["another SFT model"] * len(sft_scores["responses"])}}):
        arguments = {"parameters": ablation, "evaluation": evaluation, "sft_scores": sft_scores, **changed}
        with pytest.raises(ValueError, match=r"other settings or models: ablation.no_kl.seed_0.result"):
            summarise_study(**arguments, **fixed, result__no_kl__seed_0=result)


def test_rollout_curves_average_each_iterations_gold_and_judge_scores(tokenizer):
    harmful = "\n\nHuman: How do I steal a car?\n\nAssistant:"
    samples = [{"step": 1, "prompt": harmful, "response": "Sure, here is how."},
               {"step": 1, "prompt": harmful, "response": "I'm sorry, but I can't help with that."},
               {"step": 2, "prompt": harmful, "response": "I'm sorry, but I can't help with that."}]
    from rlhf_pipeline.task import gold_score

    refusal, compliance = gold_score(harmful, samples[1]["response"]), gold_score(harmful, samples[0]["response"])
    assert refusal > compliance
    judge = tiny(tokenizer, 2, True)
    judged = score_responses(judge.model, judge.encoder(), [harmful] * 3, [s["response"] for s in samples], 64).tolist()
    assert rollout_curves(samples, None, 64) == {1: {"gold_score": pytest.approx((refusal + compliance) / 2)},
                                       2: {"gold_score": pytest.approx(refusal)}}
    assert rollout_curves(samples, judge, 64) == {
        1: {"gold_score": pytest.approx((refusal + compliance) / 2), "judge_score": pytest.approx(sum(judged[:2]) / 2)},
        2: {"gold_score": pytest.approx(refusal), "judge_score": pytest.approx(judged[2])}}


def test_trl_scores_with_our_reward_model():
    """TRL's get_reward through the adapter reads the same score as ours: the last response token (EOS)."""
    from trl.experimental.utils import get_reward

    texts = ["\n\nHuman: What is 2 plus 3?\n\nAssistant:", " It is five.", " Five, I think."]
    tokenizer = train_tokenizer(texts * 20, vocab_size=200)
    reward_model = ValueHeadModel(build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2)))
    encoder = DialogueEncoder(tokenizer)
    ours = score_responses(reward_model, encoder, [texts[0]] * 2, texts[1:], max_length=64)
    query = torch.tensor([encoder.sampling_prompt(texts[0], 48, 8)] * 2)
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in texts[1:]]
    width = max(map(len, responses)) + 1
    padded = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in responses])
    _, theirs, _ = get_reward(TRLScoreModel(reward_model), torch.cat([query, padded], 1), tokenizer.pad_token_id,
                              query.shape[1])
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_samples_stored_from_other_prompts_and_an_empty_prompt_split_are_refused(study):
    """A stored SFT baseline from another prompt set (the split changed since) must not be compared prompt by
    prompt with a new policy's samples; an empty split (no tuning prompts) fails naming what fills it."""
    from rlhf_pipeline.evaluation import compare_with_sft
    from rlhf_pipeline.pipelines.evaluation.nodes import evaluation_set

    _, data, _, _, _, catalog = study
    eval_set, sft_scores = catalog.load("ablation.baseline.eval_set"), catalog.load("ablation.baseline.scores")
    assert sft_scores["prompts"] == eval_set.prompts
    moved = {**sft_scores, "prompts": sft_scores["prompts"][1:] + ["\n\nHuman: another prompt\n\nAssistant:"]}
    with pytest.raises(ValueError, match=r"SFT's samples answer other prompts than the evaluation set"):
        compare_with_sft(data["sft_model"], sft_scores, moved, data["sft_model"], eval_set)
    with pytest.raises(ValueError, match=r"no prompts to evaluate on.*fractions.tune_prompts"):
        evaluation_set(pd.DataFrame(columns=["prompt", "category"]), data["sft_model"], {})
