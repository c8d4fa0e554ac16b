import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protein_llava.data.records import (
    DataQualityError,
    RecordError,
    RecordReport,
    Turn,
    parse_record,
    read_conversations,
)

SEQ = "<seq> M K T A Y </seq>"


def test_flat_sft_record():
    conversation = parse_record({"instruction": "Describe.", "input": f"Here: {SEQ}", "output": "A kinase."}, "r0")
    assert conversation.turns == (Turn("user", f"Describe.\nHere: {SEQ}"), Turn("assistant", "A kinase."))
    assert conversation.proteins == ["MKTAY"]


def test_self_supervised_record_with_empty_input():
    conversation = parse_record({"instruction": "Abstract text", "input": "", "output": "continues"}, "r0")
    assert conversation.turns == (Turn("user", "Abstract text"), Turn("assistant", "continues"))


def test_xtuner_conversation_with_known_misspelling_is_mapped_and_counted():
    raw = {"conversation": [{"system": "Be brief.", "intput": SEQ, "output": "Binds ATP."}, {"input": "More?", "output": "No."}]}
    conversation = parse_record(raw, "r1")
    assert [t.role for t in conversation.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.notes == ("renamed_intput",)


def test_llava_conversations():
    raw = {"conversations": [{"from": "human", "value": SEQ}, {"from": "gpt", "value": "A kinase."}]}
    assert parse_record(raw, "r2").turns == (Turn("user", SEQ), Turn("assistant", "A kinase."))


def test_plain_text_record():
    assert parse_record({"text": "Proteins fold."}, "r3").turns == (Turn("text", "Proteins fold."),)


@pytest.mark.parametrize(
    ("raw", "reason", "message"),
    [
        ({"instruction": "x", "input": "y"}, "missing_field", "r9: missing field 'output'"),
        ({"instruction": "x", "input": "y", "outptu": "z"}, "missing_field", "missing field 'output'"),
        ({"instruction": "x", "input": 3, "output": "z"}, "wrong_type", "field 'input' must be a string, got int"),
        ({"instruction": "x", "input": "y", "output": "  "}, "empty_output", "field 'output' is empty"),
        ({"instruction": "x", "input": "<seq> M K J </seq>", "output": "z"}, "invalid_residue", "invalid residue 'J' at position 3"),
        ({"instruction": "x", "input": "<seq> M K", "output": "z"}, "bad_markup", "never closed"),
        ({"instruction": "x", "input": "<seq>  </seq>", "output": "z"}, "empty_sequence", "empty protein sequence"),
        ({"conversations": [{"from": "alien", "value": "hi"}]}, "bad_structure", "unknown speaker 'alien'"),
        ([1, 2], "not_an_object", "must be a JSON object"),
    ],
)
def test_bad_records_name_the_record_and_field(raw, reason, message):
    with pytest.raises(RecordError, match=message) as error:
        parse_record(raw, "r9")
    assert error.value.reason == reason


def test_shared_real_examples_parse(shared_data):
    records = json.loads((shared_data / "proteinlmdataset_sft_examples.json").read_text())
    conversations = [parse_record(raw, f"shared[{i}]") for i, raw in enumerate(records)]
    assert conversations[0].turns[-1].content.startswith("Based on the analysis")
    assert len(conversations[0].proteins[0]) > 300
    assert conversations[1].notes == ("renamed_intput",)
    assert conversations[1].turns[0].role == "system"


def test_jsonl_with_broken_lines_is_counted_and_the_rest_kept(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Describe.", "input": SEQ, "output": "A kinase."})
    lines = [good.encode(), b"{not json", b"\xff\xfe bad bytes", json.dumps({"instruction": "x"}).encode(), good.encode(), b""]
    path.write_bytes(b"\n".join(lines))
    report = RecordReport()
    conversations = read_conversations(str(path), report)
    assert [c.record_id for c in conversations] == ["data.jsonl:1", "data.jsonl:5"]
    assert report.skipped == {"bad_json": 1, "not_utf8": 1, "missing_field": 1}
    assert "data.jsonl:2" in report.summary()


def test_strict_mode_stops_at_the_first_bad_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(RecordError, match="data.jsonl:1: missing field 'output'"):
        read_conversations(str(path), RecordReport(strict=True))


def test_mostly_bad_data_stops_early(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Describe.", "input": SEQ, "output": "ok"})
    path.write_text("\n".join([good] * 40 + ["{broken"] * 80))
    with pytest.raises(DataQualityError, match="60 of the first 100 records are unusable"):
        read_conversations(str(path), RecordReport(min_records_for_check=100))


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataQualityError, match="is empty"):
        read_conversations(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_conversations(str(tmp_path / "missing.jsonl"))


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "Describe.", "input": SEQ, "output": "A kinase."}]), tmp_path / "d.parquet")
    (conversation,) = read_conversations(str(tmp_path / "d.parquet"))
    assert conversation.record_id == "d.parquet[0]" and conversation.proteins == ["MKTAY"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
record_keys = st.sampled_from(["instruction", "input", "intput", "output", "conversation", "conversations", "text", "from", "value", "system"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(record_keys, json_values | st.text(alphabet=st.sampled_from(list("<seq>/ MKTJ*")), max_size=20), max_size=4))
def test_arbitrary_records_parse_or_raise_record_error(raw):
    try:
        conversation = parse_record(raw, "fuzz")
    except RecordError as error:
        assert error.reason and "fuzz" in str(error)
        return
    assert conversation.turns
