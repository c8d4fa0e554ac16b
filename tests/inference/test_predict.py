"""protein_llava.inference.predict: prompts, FASTA records and their checks, resuming, batched == single answers."""

import json

import pytest
from sample_proteins import P1, P2

from protein_llava.data.prompts import TEMPLATES, user_message
from protein_llava.inference.predict import (
    FastaRecord,
    answered_ids,
    check_records,
    predict_fasta,
    read_fasta,
)
from protein_llava.loading import LoadedModel, load_protein_llm

R1, R2 = P1.replace(" ", ""), P2.replace(" ", "")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    return load_protein_llm(tiny_folder, device="cpu")


def test_templates_use_the_dataset_wording():
    assert set(TEMPLATES) == {"function", "subunit", "tissue", "ptm", "induction", "disease", "catalytic", "location"}


def test_user_message_is_the_sft_form():
    assert user_message("Q?", "MKT") == "Q?\nPresented here is a sequence of amino acids in a protein: <seq> M K T </seq>"
    assert user_message("Q?", None) == "Q?"


def test_check_records_reasons():
    records = [
        FastaRecord("a", R1),
        FastaRecord("a", R2),
        FastaRecord("empty", ""),
        FastaRecord("stop", "MKTJ*"),
        FastaRecord("long", "M" * 11),
        FastaRecord("lower", "mk t"),
    ]
    queries, problems = check_records(records, max_residues=10)
    assert [(q.id, q.residues) for q in queries] == [("lower", "MKT")]
    assert [(p.id, p.reason) for p in problems] == [
        ("a", "too_long_protein"),
        ("a", "duplicate_id"),
        ("empty", "empty_sequence"),
        ("stop", "invalid_residue"),
        ("long", "too_long_protein"),
    ]
    assert "invalid residue 'J' at position 4 in record 'stop'" in problems[3].detail
    assert "11 residues in record 'long' is longer than the encoder's limit of 10" in problems[4].detail
    assert "empty protein sequence in record 'empty'" in problems[2].detail
    assert json.loads(problems[4].to_json())["reason"] == "too_long_protein"


def test_check_records_truncate_keeps_the_first_residues():
    queries, problems = check_records([FastaRecord("long", "MKTAYIAKQR")], max_residues=4, overflow="truncate")
    assert problems == []
    assert (queries[0].residues, queries[0].length, queries[0].truncated) == ("MKTA", 10, True)


def test_read_fasta_through_biopython(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text(f">sp|X1|ONE first protein\n{R1[:30]}\n{R1[30:]}\n>two\n{R2}\n>three\n")
    records = read_fasta(path)
    assert [(r.id, r.sequence) for r in records] == [("sp|X1|ONE", R1), ("two", R2), ("three", "")]
    (tmp_path / "text.fasta").write_text("just some text\n>a\nMKT\n")
    with pytest.raises(ValueError, match="not a readable FASTA file"):
        read_fasta(tmp_path / "text.fasta")
    (tmp_path / "empty.fasta").write_text("")
    with pytest.raises(ValueError, match="no FASTA records"):
        read_fasta(tmp_path / "empty.fasta")


def test_answered_ids_drops_a_partial_line_and_refuses_another_question(tmp_path):
    out = tmp_path / "out.jsonl"
    row = {"id": "a", "sequence_length": 3, "question": "Q", "answer": "x"}
    out.write_text(json.dumps(row) + "\n" + '{"id": "b", "seque')
    assert answered_ids(out, "Q") == {"a"}
    assert out.read_text() == json.dumps(row) + "\n"
    with pytest.raises(ValueError, match="another question"):
        answered_ids(out, "other")
    assert answered_ids(tmp_path / "missing.jsonl", "Q") == set()


def test_batched_answers_equal_single_answers(loaded):
    prompts = [
        loaded.render_chat([{"role": "user", "content": user_message("What does it do?", residues)}])
        for residues in (R1, R2, "MKT")
    ]
    limits = [6, 3, 5]
    batched = loaded.answer(prompts, limits)
    single = [loaded.answer([prompt], limit)[0] for prompt, limit in zip(prompts, limits)]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


class FlakyModel:
    """Answers like the real one, except any batch holding the poisoned protein fails."""

    def __init__(self, real: LoadedModel, poisoned: str):
        self.real, self.poisoned = real, poisoned
        self.processor, self.max_residues, self.render_chat = real.processor, real.max_residues, real.render_chat

    def answer(self, prompts, max_new_tokens, proteins):
        if any(self.poisoned in residues for residues in proteins):
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.real.answer(prompts, max_new_tokens, proteins=proteins)


def test_a_failing_record_is_reported_and_the_run_goes_on(loaded, tmp_path):
    records = [FastaRecord("a", R1), FastaRecord("b", "WWCWW"), FastaRecord("c", R2)]
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    summary = predict_fasta(
        FlakyModel(loaded, "WWCWW"), records, "Q?", out, errors, batch_size=3, max_new_tokens=3, progress=False
    )
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "c"]
    problem = json.loads(errors.read_text())
    assert (problem["id"], problem["reason"]) == ("b", "generation_error")
    assert "out of memory" in problem["detail"]
    assert (summary.answered, dict(summary.problems)) == (2, {"generation_error": 1})
