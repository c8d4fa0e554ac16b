"""Tests for protein_llava.evaluation.benchmarks: the official prompt, ProteinLMBench loading and flagging,
and the sequence-grounded items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protein_llava.data.demo import QUESTION_TYPES, write_demo_dataset
from protein_llava.evaluation.benchmarks import (
    BenchmarkItem,
    ItemError,
    ablate_proteins,
    build_sequence_grounded,
    cyclic_shift,
    first_integer,
    load_proteinlmbench,
    official_prompt,
    parse_proteinlmbench_item,
    training_sequences,
)
from protein_llava.sequences import format_sequence

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

EXPECTED_PROMPT = (
    "Answer the multiple-choice question based solely on the provided context. If you are still unsure about the "
    "answer, output option 7. Select only ONE correct option by its number. Start your response with 'The correct "
    "option is' followed by the option number ONLY. eg: \"The correct option is Option X.\" Think step by step."
    "\n Question: \nWhat binds ATP?\n Options: \noption 1: kinase\noption 2: lipase\nThe correct option is:"
)


def item(**overrides) -> dict:
    raw = {
        "question": "What binds ATP?",
        "options": ["option 1: kinase", "option 2: lipase", "option 3: nothing"],
        "answer": "option 1",
        "explanation": "kinases bind ATP",
    }
    return {**raw, **overrides}


def test_official_prompt_is_byte_exact():
    assert official_prompt("What binds ATP?", ["option 1: kinase", "option 2: lipase"]) == EXPECTED_PROMPT


def test_parse_official_item():
    parsed = parse_proteinlmbench_item(item(answer="option 3"), "x[0]")
    assert parsed == BenchmarkItem("x[0]", "What binds ATP?", ("option 1: kinase", "option 2: lipase", "option 3: nothing"), 3)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (item(answer="option 4"), "answer_not_in_options"),
        (item(answer="option 0"), "answer_not_in_options"),
        (item(answer="none of these"), "unparseable_answer"),
        (item(answer=float("nan")), "unparseable_answer"),
        ({k: v for k, v in item().items() if k != "question"}, "missing_field"),
        ({k: v for k, v in item().items() if k != "answer"}, "missing_field"),
        ({k: v for k, v in item().items() if k != "options"}, "missing_field"),
        (item(question="  "), "empty_question"),
        (item(options="option 1: a"), "wrong_type"),
        (item(options=["option 1: a", "nan", "option 3: c"]), "missing_option"),
        (item(options=["option 1: a", "option 3: b"]), "bad_option_numbering"),
        (item(options=["option 1: a", "nan", ""]), "too_few_options"),
        ("not a dict", "not_an_object"),
    ],
)
def test_bad_items_raise_with_reason(raw, reason):
    with pytest.raises(ItemError) as error:
        parse_proteinlmbench_item(raw, "x[0]")
    assert error.value.reason == reason


def test_trailing_nan_options_are_dropped_and_prefixes_added():
    parsed = parse_proteinlmbench_item(item(options=["kinase", "lipase\nwith a newline", "nan", "option 4: nan"], answer="2"), "x")
    assert parsed.options == ("option 1: kinase", "option 2: lipase with a newline")
    assert parsed.answer == 2


def test_json_file_flags_bad_items_and_keeps_going(tmp_path):
    raw = [item(), item(answer="option 9"), {"question": "no options"}, item(answer="option 2")]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(raw))
    benchmark = load_proteinlmbench(str(path))
    assert [i.answer for i in benchmark.items] == [1, 2]
    assert benchmark.flag_counts() == {"answer_not_in_options": 1, "missing_field": 1}
    assert [f.item_id for f in benchmark.flagged] == ["bench.json[1]", "bench.json[2]"]
    assert len(load_proteinlmbench(str(path), limit=2).items) == 1  # limit counts flagged entries too


def test_jsonl_bad_line_is_flagged(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(item()) + "\n{not json\n")
    benchmark = load_proteinlmbench(str(path))
    assert len(benchmark.items) == 1
    assert benchmark.flag_counts() == {"bad_json": 1}


def test_csv_form(tmp_path):
    path = tmp_path / "bench.csv"
    header = "question,option 1,option 2,option 3,option 4,option 5,option 6,answer,explanation\n"
    rows = [
        '"What binds ATP?",option 1: kinase,option 2: lipase,option 3: none,nan,nan,nan,option 2,why\n',
        '"Plain cells?",kinase,lipase,,,,,option 1,\n',
        '"Gap?",a,nan,c,,,,option 1,\n',
        '"Too high?",a,b,nan,nan,nan,nan,option 5,\n',
    ]
    path.write_text(header + "".join(rows))
    benchmark = load_proteinlmbench(str(path))
    assert [i.options for i in benchmark.items] == [
        ("option 1: kinase", "option 2: lipase", "option 3: none"),
        ("option 1: kinase", "option 2: lipase"),
    ]
    assert [i.answer for i in benchmark.items] == [2, 1]
    assert benchmark.flag_counts() == {"answer_not_in_options": 1, "missing_option": 1}


def test_hub_dataset_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split))
        return [item(), item(answer="option 7")]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    benchmark = load_proteinlmbench("tsynbio/ProteinLMBench")
    assert calls == [("tsynbio/ProteinLMBench", "evaluation", "train")]
    assert len(benchmark.items) == 1 and benchmark.flag_counts() == {"answer_not_in_options": 1}


def test_missing_local_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_proteinlmbench(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_proteinlmbench(str(tmp_path / "nope.csv"))


def test_shared_sample_loads():
    sample = SHARED_DATA / "proteinlmbench_sample.json"
    if not sample.is_file():
        pytest.skip(f"shared reference data not found at {SHARED_DATA.resolve()}")
    benchmark = load_proteinlmbench(str(sample))
    assert len(benchmark.items) == 60 and not benchmark.flagged
    assert {i.num_options for i in benchmark.items} <= set(range(2, 11))


def test_cyclic_shift_moves_gold_with_its_text():
    original = BenchmarkItem("x", "q", ("option 1: a", "option 2: b", "option 3: c"), 2)
    shifted = cyclic_shift(original, 1)
    assert shifted.options == ("option 1: b", "option 2: c", "option 3: a")
    assert shifted.answer == 1
    assert cyclic_shift(original, 2).answer == 3
    assert cyclic_shift(original, 0) == original


def test_first_integer():
    assert first_integer("The correct option is Option 10.") == 10
    assert first_integer(" 3 or 4") == 3
    assert first_integer("no idea") is None


# --- sequence-grounded


def sft_record(residues: str, output: str, instruction: str = "Describe the function.") -> dict:
    return {"instruction": instruction, "input": f"Protein: {format_sequence(residues)}", "output": output}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_sequence_grounded_items(tmp_path):
    records = [sft_record(seq, f"function {i}") for i, seq in enumerate(["MKTAY", "GDSLK", "PKKKRKV", "KDELA", "WWLLA"])]
    records.append(sft_record("MKTAYW", "other instruction", instruction="Describe the structure."))
    records.append({"instruction": "No protein here.", "input": "", "output": "text"})
    records.append(sft_record("MKT*", "bad residue"))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", records)
    train = write_jsonl(tmp_path / "train.jsonl", [sft_record("KDELA", "seen before")])
    benchmark = build_sequence_grounded(heldout, [train], num_options=4, seed=0)

    assert benchmark.flag_counts() == {
        "invalid_residue": 1, "no_sequence": 1, "seen_in_training": 1, "too_few_distractors": 1,
    }
    assert len(benchmark.items) == 4
    for built in benchmark.items:
        assert "<seq> " in built.question and built.question.endswith("Which description fits this protein?")
        assert built.num_options == 4
        texts = [o.split(": ", 1)[1] for o in built.options]
        assert len(set(texts)) == 4 and all(t.startswith("function ") for t in texts)
        gold = next(r for r in records if format_sequence(built.proteins[0]) in r["input"])["output"]
        assert texts[built.answer - 1] == gold
        assert "function 3" != gold  # KDELA was seen in training
    again = build_sequence_grounded(heldout, [train], num_options=4, seed=0)
    assert again.items == benchmark.items
    assert build_sequence_grounded(heldout, [train], num_options=4, seed=0, limit=2).items == benchmark.items[:2]
    other_seed = build_sequence_grounded(heldout, [train], num_options=4, seed=1)
    assert [i.options for i in other_seed.items] != [i.options for i in benchmark.items]


def test_demo_heldout_never_overlaps_train(tmp_path):
    paths = write_demo_dataset(tmp_path, num_train=30, num_heldout=10, seed=0)
    benchmark = build_sequence_grounded(str(paths["heldout"]), [str(paths["train"])])
    # 10 proteins × 4 question types; a type whose 10 answers hold fewer than 4 classes has too few distractors.
    assert len(benchmark.items) + benchmark.flag_counts().get("too_few_distractors", 0) == 40
    assert set(benchmark.flag_counts()) <= {"too_few_distractors"}
    # Checking held-out against itself flags every item.
    against_itself = build_sequence_grounded(str(paths["heldout"]), [str(paths["heldout"])])
    assert against_itself.flag_counts() == {"seen_in_training": 40}
    assert len(training_sequences([str(paths["train"])])) == 30


def test_items_carry_their_question_type(tmp_path):
    paths = write_demo_dataset(tmp_path, num_train=30, num_heldout=30, seed=0)
    benchmark = build_sequence_grounded(str(paths["heldout"]), [str(paths["train"])])
    assert not benchmark.flagged and len(benchmark.items) == 120
    assert [item.category for item in benchmark.items[:4]] == list(QUESTION_TYPES)
    assert {item.num_options for item in benchmark.items} == {4}
    # Without a subset field, an item has no category (and the report no per-type table).
    records = [sft_record(seq, f"function {i}") for i, seq in enumerate(["MKTAY", "GDSLK", "PKKKRKV", "KDELA"])]
    plain = build_sequence_grounded(write_jsonl(tmp_path / "plain.jsonl", records), num_options=4)
    assert {item.category for item in plain.items} == {""}


def test_ablation_swaps_each_protein_for_another_of_similar_length(tmp_path):
    paths = write_demo_dataset(tmp_path, num_train=10, num_heldout=40, seed=0)
    items = build_sequence_grounded(str(paths["heldout"]), [str(paths["train"])]).items
    ablated = ablate_proteins(items, seed=0)
    assert ablated == ablate_proteins(items, seed=0) and ablated != ablate_proteins(items, seed=1)
    lengths = sorted(len(p) for p in {i.proteins[0] for i in items})
    gaps = [b - a for a, b in zip(lengths, lengths[1:])]
    replacement = {}
    for before, after in zip(items, ablated, strict=True):
        (old,), (new,) = before.proteins, after.proteins
        assert new != old and new in {i.proteins[0] for i in items}
        # Among the 4 nearest lengths: never further than the 4 largest neighbouring gaps added up.
        assert abs(len(new) - len(old)) <= sum(sorted(gaps)[-4:])
        assert replacement.setdefault(old, new) == new  # one replacement per protein, for all its questions
        # Only the sequence changes: options, answer, question type and the surrounding text stay.
        assert (after.options, after.answer, after.category, after.item_id) == (before.options, before.answer, before.category, before.item_id)
        assert after.question == before.question.replace(format_sequence(old), format_sequence(new))
        assert after.context == before.context.replace(format_sequence(old), format_sequence(new))
        assert format_sequence(old) not in after.question
    with pytest.raises(ValueError, match="at least 2 distinct proteins"):
        ablate_proteins([i for i in items if i.proteins == items[0].proteins])
