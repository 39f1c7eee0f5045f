"""`make report`: the results pages and the README's table come from the runs' outputs, stamped with provenance."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from rlhf_pipeline import reporting
from rlhf_pipeline.hooks import ProvenanceHook
from rlhf_pipeline.provenance import PROVENANCE_FILE, provenance, read_records, record_saved
from rlhf_pipeline.report import (
    BASELINE_METRICS,
    EVALUATION_FIGURES,
    MARKERS,
    STUDY_FIGURES,
    main,
    write_report,
)
from tests.conftest import PROJECT_ROOT

README = f"# project\n\nintro\n\n{MARKERS[0]}\nold table\n{MARKERS[1]}\n\n![figure](docs/results/img/x.png)\n"
RECORD = {"date": "2026-12-01T08:00:00+00:00", "commit": "abc1234", "env": None, "machine": "Linux x86_64, 2 CPU cores",
          "command": "kedro run --pipeline ablation --nodes summarise_ablation_node"}


def ablation_outputs(data: Path, ppo_max_gold: tuple[float, ...] = (-0.4, -0.5, -0.6)) -> None:
    """An ablation's summary written by the pipeline's own functions from hand-made per-seed results."""
    runs = pd.DataFrame([
        *({"variant": "ppo_max", "seed": s, "gold_score": g, "win_rate_vs_sft_gold": w, "kl_to_sft": 1.0}
          for s, (g, w) in enumerate(zip(ppo_max_gold, (0.6, 0.7, 0.8), strict=True))),
        *({"variant": "vanilla", "seed": s, "gold_score": -2.0, "win_rate_vs_sft_gold": 0.2, "kl_to_sft": 50.0}
          for s in range(3))])
    summary = reporting.summary_table(runs, "ppo_max", 0.95)
    folder = data / "08_reporting" / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    summary.to_csv(folder / "summary.csv", index=False)
    (folder / "summary.md").write_text(reporting.summary_markdown(summary, "ppo_max", 0.95))
    baseline = data / "07_model_output" / "ablation" / "baseline"
    baseline.mkdir(parents=True, exist_ok=True)
    (baseline / "metrics.json").write_text(json.dumps({"gold_score": -0.872, "win_rate_vs_sft_gold": 0.5,
                                                       "kl_to_sft": 0.0}))


@pytest.fixture
def project(tmp_path) -> SimpleNamespace:
    (tmp_path / "README.md").write_text(README)
    return SimpleNamespace(data=tmp_path / "data", docs=tmp_path / "docs", readme=tmp_path / "README.md")


def test_a_number_changed_in_the_summary_shows_in_the_page_and_the_readme(project):
    ablation_outputs(project.data)
    write_report(project.data, project.docs, [project.readme])
    readme, page = project.readme.read_text(), (project.docs / "results" / "ablation.md").read_text()
    # seeds -0.4, -0.5, -0.6: mean -0.5, sd 0.1, t(0.975, 2) = 4.303 -> half-width 4.303 * 0.1 / sqrt(3) = 0.248
    assert "| PPO-max (`ppo_max`) | 3 | -0.500 [-0.748, -0.252] | 0.700 [0.452, 0.948] |" in readme
    assert "| SFT | — | -0.872 | 0.500 | n/a | 0.000 | n/a |" in readme
    assert "| vanilla PPO (`vanilla`) | 3 | -2.000 [-2.000, -2.000] |" in readme
    assert "| TRL" not in readme and "Not stored yet: `trl_ppo`." in readme  # a row not run: named, not invented
    assert "old table" not in readme and readme.endswith("![figure](docs/results/img/x.png)\n")  # only the block
    assert "| ppo_max | 3 | -0.500 [-0.748, -0.252]" in page
    assert "recorded no provenance" in page  # no provenance.json: said, not invented

    ablation_outputs(project.data, ppo_max_gold=(-0.1, -0.2, -0.3))
    write_report(project.data, project.docs, [project.readme])
    assert "| PPO-max (`ppo_max`) | 3 | -0.200 [-0.448, 0.048] |" in project.readme.read_text()
    assert "| ppo_max | 3 | -0.200 [-0.448, 0.048]" in (project.docs / "results" / "ablation.md").read_text()


def test_pages_are_stamped_with_the_run_that_wrote_their_source(project):
    ablation_outputs(project.data)
    records = {"ablation.markdown": RECORD, "ablation.vanilla.seed_1.result": {**RECORD, "command": "kedro run X"},
               "ablation.vanilla.seed_0.result": {**RECORD, "command": "kedro run X"}}
    (project.data / "08_reporting" / "provenance.json").write_text(json.dumps(records))
    write_report(project.data, project.docs, [], ["--data", "d"])
    page = (project.docs / "results" / "ablation.md").read_text()
    assert ("*`ablation/summary.md`: from `kedro run --pipeline ablation --nodes summarise_ablation_node`, run "
            "2026-12-01 08:00 UTC at commit `abc1234` on Linux x86_64, 2 CPU cores.*") in page
    assert "- vanilla seed 0, vanilla seed 1: `kedro run X` at commit `abc1234`, 2026-12-01 08:00 UTC" in page
    index = (project.docs / "results" / "index.md").read_text()
    assert "by `python -m rlhf_pipeline.report --data d`" in index
    # sources absent: a page that names what would fill it, so that every link of the site resolves
    assert "Not run yet" in (project.docs / "results" / "long_run.md").read_text()
    assert "- [Long run](long_run.md) (kept from an earlier report: its source was absent)" in index


def test_benchmark_json_becomes_a_table_with_its_provenance(project):
    folder = project.data / "08_reporting" / "benchmarks"
    folder.mkdir(parents=True)
    shape = {"seconds_per_iteration": [2.0, 3.0, 2.5], "trl_seconds_per_iteration": [4.0, 3.0, 10.0],
             "speed_ups": [2.0, 1.0, 4.0], "useful_gflops": [80.0, 90.0, 85.0], "update_real_token_share": 0.81,
             "phase_seconds": {"generate": 0.3, "score": 0.25, "update": 1.6, "advantages": 0.01}}
    (folder / "bench_ppo.json").write_text(json.dumps({"kind": "bench_ppo", "shapes": {"realistic": shape},
                                                       "provenance": {**RECORD, "command": "bench_ppo.py --json x"}}))
    write_report(project.data, project.docs, [project.readme])
    page = (project.docs / "results" / "benchmarks.md").read_text()
    assert "| realistic | 2.000 / 3.000 / 2.500 | 0.30 / 0.25 / 1.60 | 81 % | 80–90 | 4.000 / 3.000 / 10.000 | 2.00× |" in page
    assert "from `bench_ppo.py --json x`, run 2026-12-01 08:00 UTC" in page
    assert project.readme.read_text() == README  # no ablation summary: the README's table is left alone

    (folder / "other.json").write_text(json.dumps({"kind": "something"}))
    with pytest.raises(ValueError, match="other.json: not a benchmark result .*none of bench_ppo"):
        write_report(project.data, project.docs, [project.readme])


def test_missing_sources_and_markers_are_named(project):
    with pytest.raises(FileNotFoundError, match="08_reporting: no evaluation summary, study summary or benchmark"):
        write_report(project.data, project.docs, [project.readme])
    ablation_outputs(project.data)
    project.readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="README.md: no '<!-- results:headline -->'"):
        write_report(project.data, project.docs, [project.readme])
    assert not (project.docs / "results").exists()  # every page is built before anything is written


@pytest.mark.parametrize(("file", "content", "message"), [
    ("provenance.json", "{not json", "provenance.json: not valid JSON"),
    ("provenance.json", '{"ablation.markdown": {"date": "2026-12-01"}}',
     r"the record of 'ablation.markdown': a provenance record needs \['date', 'command', 'machine'\]"),
    ("provenance.json", json.dumps({"ablation.markdown": {**RECORD, "date": "yesterday"}}), "'yesterday' is not ISO"),
    ("ablation/summary.csv", "variant,seeds,gold_score\nppo_max,3,high\n", r"\['gold_score'\] hold text"),
    ("../07_model_output/ablation/baseline/metrics.json", '{"gold_score": "-0.9"}',
     "metrics.json: expected an object of metric -> number"),
    ("benchmarks/x.json", json.dumps({"kind": "bench_gpu_estimate", "estimate": [], "provenance": {"date": 1}}),
     "x.json: a provenance record needs"),
    ("ablation/summary.csv", "", "summary.csv: not a study summary"),
    ("ablation/summary.csv", "row,gold_score\nppo_max,-0.5\n", r"summary.csv: not a study summary \(no column"),
    ("benchmarks/x.json", '{"shapes": [1, 2]}', "x.json: not a benchmark result"),
])
def test_a_malformed_source_fails_naming_its_file_and_writes_nothing(project, file, content, message):
    ablation_outputs(project.data)
    (project.data / "08_reporting" / file).parent.mkdir(parents=True, exist_ok=True)
    (project.data / "08_reporting" / file).write_text(content)
    with pytest.raises(ValueError, match=message):
        write_report(project.data, project.docs, [project.readme])
    assert not (project.docs / "results").exists() and project.readme.read_text() == README


def test_the_report_reads_the_files_the_catalog_writes():
    catalog = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "catalog.yml").read_text())

    def filepaths(entry) -> set[str]:
        if isinstance(entry, dict):
            return ({entry["filepath"]} if isinstance(entry.get("filepath"), str)
                    else set().union(*map(filepaths, entry.values())))
        return set()

    written = filepaths(catalog)
    read = {"data/08_reporting/evaluation_summary.md", "data/" + BASELINE_METRICS,
            *(f"data/08_reporting/{name}" for name in EVALUATION_FIGURES),
            *(f"data/08_reporting/{{study}}/{name}" for name in ["summary.md", "summary.csv", *STUDY_FIGURES])}
    assert read <= written, read - written
    assert {"evaluation_markdown", "{study}.markdown"} <= set(catalog)  # the provenance records' names


def test_the_command_line_exits_with_the_message_not_a_traceback(project, capsys):
    with pytest.raises(SystemExit, match="report: .*08_reporting: no evaluation summary"):
        main(["--data", str(project.data), "--docs", str(project.docs), "--tables", str(project.readme)])


def test_provenance_hook_keeps_the_records_of_datasets_the_run_did_not_save(tmp_path):
    path = tmp_path / PROVENANCE_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"sft_metrics": RECORD}))
    hook = ProvenanceHook()
    hook.after_context_created(SimpleNamespace(project_path=tmp_path))
    hook.before_pipeline_run({"env": "test"})
    hook.after_dataset_saved("evaluation_markdown")
    records = json.loads(path.read_text())
    assert records["sft_metrics"] == RECORD
    assert records["evaluation_markdown"]["env"] == "test"
    assert set(records["evaluation_markdown"]) == {"date", "commit", "command", "machine", "env"}

    path.write_text("{torn")  # a corrupt file fails the run before its first node, naming the file
    with pytest.raises(ValueError, match="provenance.json: not valid JSON"):
        hook.before_pipeline_run({"env": "test"})


def save_records(path: Path, worker: int) -> None:
    for i in range(25):
        record_saved(path, f"dataset_{worker}_{i}", RECORD)


def test_runs_saving_at_once_keep_every_record(tmp_path):
    path = tmp_path / "provenance.json"
    workers = [multiprocessing.get_context("fork").Process(target=save_records, args=(path, w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(read_records(path)) == 75  # 3 processes x 25 read-modify-writes, none lost to another's rename


def test_provenance_names_the_program_and_the_commit(tmp_path):
    record = provenance(["/venv/lib/python3.11/site-packages/kedro/__main__.py", "run", "--params", "a=1 b"])
    assert record["command"] == "python -m kedro run --params 'a=1 b'"
    assert provenance(["/venv/bin/kedro", "run"])["command"] == "kedro run"
    assert provenance([], path=tmp_path)["commit"] is None  # not a git work tree
    assert record["date"].endswith("+00:00") and "CPU cores" in record["machine"]
