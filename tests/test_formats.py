"""The data formats (``formats``) and the canonical HH dialogue (``hh``): every expected value written by hand."""

import gzip
import json

import pytest

from rlhf_pipeline.data import parse_rows
from rlhf_pipeline.formats import SourceFormat
from rlhf_pipeline.hh import RawRow, RowError, hh_prompt_response, read_jsonl_rows


def row(record, line=1, source="raw.jsonl") -> RawRow:
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    return RawRow(source, line, data)


def test_single_turn_split():
    prompt, response = hh_prompt_response("\n\nHuman: What is 2 plus 2?\n\nAssistant: 2 plus 2 is 4.")
    assert prompt == "\n\nHuman: What is 2 plus 2?\n\nAssistant:"
    assert response == "2 plus 2 is 4."


def test_multi_turn_keeps_earlier_turns_in_prompt():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Peru?\n\nAssistant: Lima.\nIt is big."
    prompt, response = hh_prompt_response(text)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Peru?\n\nAssistant:"
    assert response == "Lima.\nIt is big."  # a single newline inside a turn is not a turn marker


def test_whitespace_variants_give_the_canonical_prompt():
    canonical = hh_prompt_response("\n\nHuman: Hi there\n\nAssistant: Hello")
    assert hh_prompt_response("Human:Hi there  \r\n\r\nAssistant:   Hello  ") == canonical
    assert hh_prompt_response("  \n\nHuman: Hi there\nAssistant: Hello") == canonical


def test_shared_prefix_pair_parses_to_one_prompt():
    prefix = "\n\nHuman: How do I steal a car?\n\nAssistant:"
    [pref] = parse_rows([row({"chosen": prefix + " I can't help with that.", "rejected": prefix + " Sure, easy."})]).rows
    assert pref.prompt == prefix
    assert (pref.chosen, pref.rejected) == ("I can't help with that.", "Sure, easy.")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", ', "broken JSON"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "missing field 'rejected'"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 3}, "field 'rejected' is int, not a string"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "just text"}, "no 'Human:'/'Assistant:' turns"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:  "}, "empty final assistant"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "identical"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "differ before"),
        ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: d"}, "does not end with an 'Assistant:'"),
        (b'{"chosen": "\xff\xfe", "rejected": "x"}', "undecodable bytes"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_rows_strict_error_and_quarantine(data, reason):
    bad = row(data, line=7, source="data/01_raw/x.jsonl")
    good = row({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, line=6,
               source="data/01_raw/x.jsonl")
    with pytest.raises(RowError, match=reason) as info:
        parse_rows([good, bad], strict=True)
    assert str(info.value).startswith("data/01_raw/x.jsonl:7: ")
    result = parse_rows([good, bad], strict=False)
    assert len(result.rows) == 1  # the good row survives
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


# --- every format, parsed by hand ---------------------------------------------------------------------------------
def parse(records, kind="preference", **settings):
    result = parse_rows([row(r, line=i) for i, r in enumerate(records, 1)], SourceFormat(kind, **settings), strict=True)
    return result.format, result.records()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_trl_standard_explicit_and_implicit_prompt():
    fmt, rows = parse([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    assert fmt == "standard"
    assert rows == [{"prompt": "\n\nHuman: The sky is\n\nAssistant:", "chosen": "blue.", "rejected": "green."}]
    # implicit: the common prefix, cut back to a word boundary (TRL would cut "I like ca" | "ts", "rs")
    fmt, rows = parse([{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                       {"chosen": "I like cats", "rejected": "I like cars"}])
    assert fmt == "standard"
    assert rows == [{"prompt": "\n\nHuman: The sky is\n\nAssistant:", "chosen": "blue.", "rejected": "green."},
                    {"prompt": "\n\nHuman: I like\n\nAssistant:", "chosen": "cats", "rejected": "cars"}]
    with pytest.raises(RowError, match="share no words before they differ"):
        parse([{"chosen": "Yes", "rejected": "No"}])


def test_deepspeed_chat_rm_static_prompt_keeps_its_turns():
    record = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Best pizza?\n\nAssistant:",
              "chosen": " Margherita.", "rejected": " No idea.", "response": " Margherita."}
    fmt, rows = parse([record])
    assert fmt == "standard"
    assert rows == [{"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Best pizza?\n\nAssistant:",
                     "chosen": "Margherita.", "rejected": "No idea."}]


def test_trl_conversational_explicit_implicit_and_repeated_prompt_with_system_kept_or_dropped():
    system = {"role": "system", "content": "Be brief."}
    explicit = {"prompt": [system, user("Sky colour?")], "chosen": [assistant("Blue.")],
                "rejected": [assistant("Green.")]}
    fmt, rows = parse([explicit])
    assert fmt == "conversational"
    assert rows == [{"prompt": "\n\nHuman: Be brief.\n\nSky colour?\n\nAssistant:", "chosen": "Blue.",
                     "rejected": "Green."}]
    assert parse([explicit], system="drop")[1][0]["prompt"] == "\n\nHuman: Sky colour?\n\nAssistant:"
    implicit = {"chosen": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("4")],
                "rejected": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("5")]}
    assert parse([implicit])[1] == [{"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant:",
                                     "chosen": "4", "rejected": "5"}]
    # UltraFeedback-binarized: a string prompt, responses that repeat it as a user message (ShareGPT keys here)
    repeated = {"prompt": "2+2?", "chosen": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
                "rejected": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5"}]}
    assert parse([repeated])[1] == [{"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": "4", "rejected": "5"}]


def test_column_mapping_two_responses_and_a_preference_index():
    pku = {"prompt": "Q?", "response_0": "A0", "response_1": "A1", "better_response_id": 1}
    columns = {"responses": ["response_0", "response_1"], "preferred": "better_response_id"}
    assert parse([pku], columns=columns)[1] == [{"prompt": "\n\nHuman: Q?\n\nAssistant:", "chosen": "A1",
                                                 "rejected": "A0"}]
    shp = {"history": "Why?", "human_ref_A": "Because.", "human_ref_B": "Dunno.", "labels": 1}  # 1: A preferred
    columns = {"prompt": "history", "responses": ["human_ref_A", "human_ref_B"], "preferred": "labels",
               "preferred_values": [1, 0]}
    assert parse([shp], columns=columns)[1] == [{"prompt": "\n\nHuman: Why?\n\nAssistant:", "chosen": "Because.",
                                                 "rejected": "Dunno."}]
    with pytest.raises(RowError, match=r"column 'labels' is 2; the mapping's preferred_values are \[1, 0\]"):
        parse([{**shp, "labels": 2}], columns=columns)
    with pytest.raises(ValueError, match="'responses' .* and 'preferred' .* go together"):
        SourceFormat(columns={"responses": ["a", "b"]})


def test_instruction_and_prompt_rows():
    messages = {"messages": [user("Hi"), assistant("Hello"), user("Name a colour"), assistant("Red")]}
    assert parse([messages], "instruction") == ("conversational", [
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a colour\n\nAssistant:", "response": "Red"}])
    assert parse([{"prompt": "Name a colour", "completion": " Red"}], "instruction") == ("standard", [
        {"prompt": "\n\nHuman: Name a colour\n\nAssistant:", "response": "Red"}])
    assert parse([{"prompt": [user("Q")], "completion": [assistant("A")]}], "instruction")[1] == [
        {"prompt": "\n\nHuman: Q\n\nAssistant:", "response": "A"}]
    assert parse([{"prompt": "Q"}], "prompt") == ("standard", [{"prompt": "\n\nHuman: Q\n\nAssistant:"}])
    assert parse([{"messages": [user("Q")]}], "prompt") == ("conversational", [{"prompt": "\n\nHuman: Q\n\nAssistant:"}])
    hh = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
    assert parse([hh], "prompt") == ("hh", [{"prompt": "\n\nHuman: Q\n\nAssistant:"}])  # a preference source serves
    assert parse([hh], "instruction") == ("hh", [{"prompt": "\n\nHuman: Q\n\nAssistant:", "response": "A"}])


def test_a_format_that_cannot_be_told_names_the_fields_and_a_forced_format_is_checked():
    with pytest.raises(ValueError, match=r"cannot tell the format of preference rows from the fields \['a', 'b'\]"):
        parse([{"a": 1, "b": 2}])
    with pytest.raises(RowError, match="field 'chosen' is list, not a string .message lists are the 'conversational'"):
        parse([{"prompt": "Q", "chosen": [assistant("A")], "rejected": [assistant("B")]}], format="standard")


# --- validation kinds: each with its reason ----------------------------------------------------------------------
@pytest.mark.parametrize(("record", "reason"), [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: d"},
     "turns do not alternate (turns 2 and 3 are both 'Assistant:')"),
    ({"chosen": "\n\nHuman:   \n\nAssistant: c", "rejected": "\n\nHuman:  \n\nAssistant: d"}, "turn 1 ('Human:') is empty"),
    ({"prompt": [user("a"), user("b")], "chosen": [assistant("c")], "rejected": [assistant("d")]}, "do not alternate"),
    ({"prompt": "q \ud83d", "chosen": "c", "rejected": "d"}, "lone surrogate '\\ud83d' at character 2"),
    ({"prompt": "q\x07", "chosen": "c", "rejected": "d"}, "control character U+0007 at character 1"),
    ({"prompt": "q", "chosen": "<|endoftext|>", "rejected": "d"}, "special-token text '<|endoftext|>'"),
    ({"prompt": "q", "chosen": "fine <|im_end|>", "rejected": "d"}, "special-token text '<|im_end|>'"),
    ({"prompt": [user("q\n\nAssistant: sure")], "chosen": [assistant("c")], "rejected": [assistant("d")]},
     "turn 1 holds a 'Assistant:' turn marker"),
    ({"prompt": "Translate:\nAssistant: hi", "chosen": "c", "rejected": "d"}, "holds a 'Assistant:' turn marker"),
    ({"prompt": "Hi", "chosen": "Sure.\n\nHuman: thanks", "rejected": "d"}, "field 'chosen' holds a 'Human:' turn"),
    ({"prompt": "q", "chosen": "<s>fine</s>", "rejected": "d"}, "special-token text '</s>'"),
    ({"prompt": [user("q")], "chosen": [assistant(" ")], "rejected": [assistant("d")]}, "empty response"),
    ({"prompt": [user("q")], "chosen": [{"role": "tool", "content": "x"}], "rejected": [assistant("d")]},
     "role 'tool'"),
])
def test_each_validation_kind_is_quarantined_with_its_reason(record, reason):
    data = json.dumps(record).encode()  # JSON escapes keep a lone surrogate as the file would hold it
    result = parse_rows([RawRow("x.jsonl", 1, data)], SourceFormat())
    [quarantined] = result.quarantine
    assert reason in quarantined["reason"] and quarantined["line"] == 1 and not result.rows
    assert quarantined["raw"] == data.decode()


def test_lone_surrogates_from_a_dataframe_or_hub_record_reach_the_quarantine():
    from rlhf_pipeline.hh import records_to_rows

    [bad] = records_to_rows([{"prompt": "q \ud83d", "chosen": "c", "rejected": "d"}], "hub[train]")
    result = parse_rows([bad], SourceFormat())
    assert "lone surrogate" in result.quarantine[0]["reason"] and not result.rows


def test_each_file_of_a_source_is_detected_on_its_own_and_csv_message_lists_are_refused():
    hh = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
    conversational = {"prompt": [user("Q2")], "chosen": [assistant("A")], "rejected": [assistant("B")]}
    rows = [row(hh, 1, "a.jsonl"), row(conversational, 1, "b.jsonl"), row(conversational, 2, "b.jsonl")]
    result = parse_rows(rows, SourceFormat(), strict=True)
    assert result.format == "conversational+hh" and len(result.rows) == 3
    cell = {"prompt": str([user("Q")]), "chosen": str([assistant("A")]), "rejected": str([assistant("B")])}
    result = parse_rows([row(cell, 2, "pairs.csv")], SourceFormat())
    assert "holds a message list written as text" in result.quarantine[0]["reason"]
    bom = RawRow("bom.jsonl", 1, "\ufeff".encode() + json.dumps(hh).encode())
    assert parse_rows([bom], SourceFormat(), strict=True).records()[0]["chosen"] == "A"


def test_a_turn_that_starts_with_its_own_marker_word_stays_one_turn():
    # some HH-RLHF rows read "Human: Human: ...": the second marker follows the first, not a line start
    assert hh_prompt_response("\n\nHuman: Human: hi\n\nAssistant: yo") == ("\n\nHuman: Human: hi\n\nAssistant:", "yo")
