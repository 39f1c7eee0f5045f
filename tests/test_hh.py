import gzip
import json

import pytest

from rlhf_pipeline.hh import (
    RawRow,
    RowError,
    parse_raw_row,
    parse_rows,
    read_jsonl_rows,
    split_prompt_response,
)


def row(record, line=1, source="raw.jsonl") -> RawRow:
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    return RawRow(source, line, data)


def test_single_turn_split():
    prompt, response = split_prompt_response("\n\nHuman: What is 2 plus 2?\n\nAssistant: 2 plus 2 is 4.")
    assert prompt == "\n\nHuman: What is 2 plus 2?\n\nAssistant:"
    assert response == "2 plus 2 is 4."


def test_multi_turn_keeps_earlier_turns_in_prompt():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Peru?\n\nAssistant: Lima.\nIt is big."
    prompt, response = split_prompt_response(text)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Peru?\n\nAssistant:"
    assert response == "Lima.\nIt is big."  # a single newline inside a turn is not a turn marker


def test_whitespace_variants_give_the_canonical_prompt():
    canonical = split_prompt_response("\n\nHuman: Hi there\n\nAssistant: Hello")
    assert split_prompt_response("Human:Hi there  \r\n\r\nAssistant:   Hello  ") == canonical
    assert split_prompt_response("  \n\nHuman: Hi there\nAssistant: Hello") == canonical


def test_shared_prefix_pair_parses_to_one_prompt():
    prefix = "\n\nHuman: How do I steal a car?\n\nAssistant:"
    pref = parse_raw_row(row({"chosen": prefix + " I can't help with that.", "rejected": prefix + " Sure, easy."}))
    assert pref.prompt == prefix
    assert (pref.chosen, pref.rejected) == ("I can't help with that.", "Sure, easy.")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", ', "broken JSON"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "missing field 'rejected'"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 3}, "field 'rejected' is int, not a string"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:  "}, "empty final assistant"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "identical"),
        ({"chosen": "just text", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "no 'Human:'/'Assistant:' turns"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "differ before"),
        ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: d"}, "does not end with an 'Assistant:'"),
        (b'{"chosen": "\xff\xfe", "rejected": "x"}', "undecodable bytes"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_rows_strict_error_and_quarantine(data, reason):
    bad = row(data, line=7, source="data/01_raw/x.jsonl")
    good = row({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, line=8)
    with pytest.raises(RowError, match=reason) as info:
        parse_rows([bad, good], strict=True)
    assert str(info.value).startswith("data/01_raw/x.jsonl:7: ")
    result = parse_rows([bad, good], strict=False)
    assert len(result.preferences) == 1  # the good row survives
    [quarantined] = result.quarantine
    assert quarantined["line"] == 7 and quarantined["source"] == "data/01_raw/x.jsonl"
    assert reason in quarantined["reason"]
    assert quarantined["raw"]  # the original row is kept, nothing is lost


def test_read_gzip_jsonl_numbers_lines(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write('{"a": 1}\n\n{"b": 2}\n')
    rows = list(read_jsonl_rows(path))
    assert [(r.line, r.data) for r in rows] == [(1, b'{"a": 1}'), (2, b""), (3, b'{"b": 2}')]
    assert rows[0].source == str(path)
