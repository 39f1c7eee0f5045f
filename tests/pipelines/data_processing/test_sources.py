"""The raw-data sources: the catalog datasets each environment names, and the parse node on what they load."""

import gzip
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
from kedro.io import DataCatalog, DatasetError

from rlhf_pipeline.datasets import EmbeddedTaskDataset, RawRowsDataset
from rlhf_pipeline.hh import RawRow, RowError
from tests.pipelines.conftest import parse_preferences

PROJECT_ROOT = Path(__file__).resolve().parents[3]

TASK = {"num_pairs": 30, "seed": 0, "multi_turn_rate": 0.2, "harmful_rate": 0.25, "label_flip_rate": 0.2,
        "length_bias": 0.05}

RECORDS = [
    {"chosen": "\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.",
     "rejected": "\n\nHuman: What is 2 plus 3?\n\nAssistant: I do not know."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: Use a tension wrench."},
]


def write_jsonl(path, records) -> str:
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return str(path)


# --- EmbeddedTaskDataset ------------------------------------------------------------------------------------
def test_embedded_task_is_generated_once_and_named_by_file_and_line(tmp_path):
    path = tmp_path / "raw" / "task.jsonl"
    rows = EmbeddedTaskDataset(str(path), TASK).load()
    assert len(rows) == 30 == len(path.read_text().splitlines())
    assert all(isinstance(row, RawRow) for row in rows)
    assert (rows[0].source, rows[0].line, rows[-1].line) == (str(path), 1, 30)
    assert json.loads((tmp_path / "raw" / "task.jsonl.task.json").read_text())["num_pairs"] == 30

    written = path.stat().st_mtime_ns
    again = EmbeddedTaskDataset(str(path), TASK).load()
    assert path.stat().st_mtime_ns == written and again == rows  # up to date: read back, not rewritten


def test_embedded_task_is_rewritten_when_its_settings_change(tmp_path):
    path = tmp_path / "task.jsonl"
    first = EmbeddedTaskDataset(str(path), TASK).load()
    reseeded = EmbeddedTaskDataset(str(path), {**TASK, "seed": 1}).load()
    assert len(reseeded) == 30 and [r.data for r in reseeded] != [r.data for r in first]
    resized = EmbeddedTaskDataset(str(path), {**TASK, "seed": 1, "num_pairs": 12}).load()
    assert len(resized) == 12 == len(path.read_text().splitlines())
    (tmp_path / "task.jsonl.task.json").unlink()  # a file without its settings record is not trusted
    assert EmbeddedTaskDataset(str(path), TASK).load() == first


def test_embedded_task_rejects_bad_settings_and_saves(tmp_path):
    with pytest.raises(ValueError, match="task.num_pairs must be >= 1"):
        EmbeddedTaskDataset(str(tmp_path / "task.jsonl"), {**TASK, "num_pairs": 0})
    with pytest.raises(TypeError, match="num_pair"):
        EmbeddedTaskDataset(str(tmp_path / "task.jsonl"), {"num_pair": 10})
    with pytest.raises(DatasetError, match="generated from `task`"):
        EmbeddedTaskDataset(str(tmp_path / "task.jsonl"), TASK).save(RECORDS)


# --- RawRowsDataset ---------------------------------------------------------------------------------------
def test_jsonl_files_are_read_in_order_each_row_naming_its_file(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    second = write_jsonl(tmp_path / "b.jsonl.gz", [RECORDS[1], {"chosen": "x"}])
    rows = RawRowsDataset([first, second]).load()
    assert [(row.source, row.line) for row in rows] == [(first, 1), (first, 2), (second, 1), (second, 2)]
    valid, quarantine, _ = parse_preferences(rows, strict=False)
    assert len(valid) == 3 and quarantine[["source", "line"]].values.tolist() == [[second, 2]]
    with pytest.raises(RowError, match=rf"{second}:2: missing field 'rejected'"):
        parse_preferences(rows, strict=True)
    assert RawRowsDataset(first).load() == rows[:2]  # one file as a plain string
    with pytest.raises(DatasetError, match="cannot save to a list of files"):
        RawRowsDataset([first, second]).save(RECORDS)


# --- parse_preferences on every loaded form -----------------------------------------------------------------
def test_every_source_form_gives_the_same_preference_rows(tmp_path):
    from_file = RawRowsDataset(write_jsonl(tmp_path / "hh.jsonl", RECORDS)).load()
    dataset = datasets.Dataset.from_list(RECORDS)
    forms = {"rows": from_file, "Dataset": dataset, "DatasetDict": datasets.DatasetDict({"train": dataset}),
             "DataFrame": pd.DataFrame(RECORDS)}
    parsed = {name: parse_preferences(raw, strict=True) for name, raw in forms.items()}
    expected = parsed["rows"][0]
    assert len(expected) == 2 and expected.loc[1, "chosen"] == "I can't help with that."
    assert expected.loc[1, "prompt"].endswith("\n\nHuman: How do I pick a lock?\n\nAssistant:")
    for name, (valid, quarantine, counts) in parsed.items():
        pd.testing.assert_frame_equal(valid, expected, obj=name)
        assert quarantine.empty and counts["data/preferences_valid"]["value"] == 2


def test_records_without_a_file_are_named_by_dataset_and_split():
    bad = [RECORDS[0], {"chosen": RECORDS[1]["chosen"], "rejected": None}]
    with pytest.raises(RowError, match=r"^raw_preferences:2: field 'rejected' is float"):  # pandas: None -> NaN
        parse_preferences(pd.DataFrame(bad), strict=True)
    with pytest.raises(RowError, match=r"^raw_preferences\[test\]:2: field 'rejected' is NoneType"):
        parse_preferences(datasets.DatasetDict({"test": datasets.Dataset.from_list(bad)}), strict=True)


def test_a_dataset_dict_of_several_splits_or_an_unknown_type_fails():
    dataset = datasets.Dataset.from_list(RECORDS)
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]; load one split"):
        parse_preferences(datasets.DatasetDict({"train": dataset, "test": dataset}), strict=False)
    with pytest.raises(TypeError, match="cannot parse a dict"):
        parse_preferences({"chosen": "x"}, strict=False)
    with pytest.raises(TypeError, match="holds a dict, not an hh.RawRow"):
        parse_preferences(RECORDS, strict=False)


# --- the project's catalog: raw_preferences per environment -------------------------------------------------
PATHS = {"data_processing": {"sources": {"preferences": {"paths": ["x.jsonl"]}}}}
SHARED = ["../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"]


def raw_preferences_entry(env: str, runtime_params: dict) -> dict:
    from kedro.config import OmegaConfigLoader

    from rlhf_pipeline import settings

    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), env=env, runtime_params=runtime_params,
                               **settings.CONFIG_LOADER_ARGS)
    return loader["catalog"]["raw_preferences"]


@pytest.mark.parametrize(("env", "runtime_params", "kind", "where"), [
    ("base", {}, EmbeddedTaskDataset, ("data/01_raw/synthetic_hh.jsonl", 9000, 0)),
    ("base", PATHS, RawRowsDataset, ["x.jsonl"]),  # files on the command line replace the embedded task
    ("test", {}, EmbeddedTaskDataset, ("data/01_raw/synthetic_hh.jsonl", 400, 0)),
    ("test", {"task": {"num_pairs": 50, "seed": 1}}, EmbeddedTaskDataset, ("data/01_raw/synthetic_hh.jsonl", 50, 1)),
    ("test", PATHS, RawRowsDataset, ["x.jsonl"]),
    ("smollm2", PATHS, RawRowsDataset, ["x.jsonl"]),
    ("smollm2", {}, RawRowsDataset, SHARED[0]),
    ("hh_rlhf", {}, "HFDataset", ("Anthropic/hh-rlhf", {"split": "train", "data_dir": None})),
    ("hh_rlhf", PATHS, RawRowsDataset, ["x.jsonl"]),
    ("gpu", {"data_processing": {"sources": {"preferences": {"hub_split": "test", "data_dir": "harmless-base"}}}},
     "HFDataset",
     ("Anthropic/hh-rlhf", {"split": "test", "data_dir": "harmless-base"})),
])
def test_each_environment_names_its_raw_preferences(env, runtime_params, kind, where):
    entry = raw_preferences_entry(env, runtime_params)
    dataset = DataCatalog.from_config({"raw_preferences": entry}).get("raw_preferences")  # builds it: no typo
    if kind is EmbeddedTaskDataset:
        assert isinstance(dataset, kind)
        assert (entry["filepath"], entry["task"]["num_pairs"], entry["task"]["seed"]) == where
        assert entry["task"]["harmful_rate"] == 0.25
    elif kind is RawRowsDataset:
        assert isinstance(dataset, kind) and entry["filepath"] == where
    else:
        assert type(dataset).__name__ == kind and (entry["dataset_name"], entry["dataset_kwargs"]) == where


@pytest.mark.parametrize("name", ["pairs.json", "pairs.json.gz", "pairs.csv", "pairs.csv.gz", "pairs.parquet"])
def test_json_csv_and_parquet_files_give_the_same_rows_named_by_file_and_record(tmp_path, name):
    path = tmp_path / name
    frame = pd.DataFrame(RECORDS * 2)
    if ".csv" in name:
        frame.to_csv(path, index=False)
    elif ".parquet" in name:
        frame.to_parquet(path)
    else:
        text = json.dumps(frame.to_dict("records"))
        (gzip.open(path, "wt") if name.endswith(".gz") else open(path, "w")).write(text)
    rows = RawRowsDataset(str(path)).load()
    assert [(row.source, row.line) for row in rows] == [(str(path), n) for n in (1, 2, 3, 4)]
    valid, quarantine, _ = parse_preferences(rows, strict=True)
    assert valid.loc[1, "chosen"] == "I can't help with that." and len(valid) == 4 and quarantine.empty


def test_unknown_kinds_and_empty_files_fail_naming_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"pairs.txt: cannot read a '.txt' file"):
        RawRowsDataset(str(tmp_path / "pairs.txt"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="empty.jsonl: the file holds no rows"):
        RawRowsDataset(str(tmp_path / "empty.jsonl")).load()
    assert RawRowsDataset([]).load() == []  # no files: a stage without a source of its own
    with pytest.raises(DatasetError, match="no such file"):
        RawRowsDataset(str(tmp_path / "absent.jsonl")).load()


@pytest.mark.parametrize("suffix", [".jsonl.bz2", ".jsonl.xz", ".JSONL.GZ"])
def test_compressed_json_lines_are_read_line_by_line(tmp_path, suffix):
    path = str(tmp_path / f"pairs{suffix}")
    RawRowsDataset(path).save(RECORDS)
    rows = RawRowsDataset(path).load()
    assert [(row.source, row.line) for row in rows] == [(path, 1), (path, 2)]
    assert len(parse_preferences(rows, strict=True)[0]) == 2
