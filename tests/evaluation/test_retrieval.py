"""Tests for protein_llava.evaluation.retrieval: the identity definition against brute force, the k-mer
prefilter, and the retrieval arm on sequence-grounded items built from files."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from Bio.Align import substitution_matrices

from protein_llava.evaluation import retrieval
from protein_llava.evaluation.benchmarks import build_sequence_grounded, option_text
from protein_llava.evaluation.retrieval import (
    TrainingSet,
    identity,
    identity_aligner,
    load_training_proteins,
    retrieval_predictions,
    summarise_identity,
)
from protein_llava.sequences import format_sequence

STANDARD = "ACDEFGHIKLMNPQRSTVWY"
INSTRUCTION = "Describe the function of this protein."
BLOSUM62 = substitution_matrices.load("BLOSUM62")
STAND_IN = {"U": "C", "O": "K"}
PREDICTION_KEYS = {
    "item_id", "num_options", "answer", "predicted", "correct", "unparseable",
    "scores", "probabilities", "max_identity", "nearest_record", "nearest_identity_option",
}


def global_alignments(a: str, b: str) -> list[tuple[int, int]]:
    """(score, identical pairs) of every global alignment of a and b; a gap of n costs 11 + (n - 1)."""
    outcomes = []

    def walk(i: int, j: int, score: int, identical: int, previous: str) -> None:
        if i == len(a) and j == len(b):
            outcomes.append((score, identical))
            return
        if i < len(a) and j < len(b):
            pair = BLOSUM62[STAND_IN.get(a[i], a[i]), STAND_IN.get(b[j], b[j])]
            walk(i + 1, j + 1, score + int(pair), identical + (a[i] == b[j]), "pair")
        if i < len(a):
            walk(i + 1, j, score - (1 if previous == "gap_in_b" else 11), identical, "gap_in_b")
        if j < len(b):
            walk(i, j + 1, score - (1 if previous == "gap_in_a" else 11), identical, "gap_in_a")

    walk(0, 0, 0, 0, "start")
    return outcomes


def brute_force_identities(a: str, b: str) -> tuple[int, int]:
    """(fewest, most) identical pairs among the best-scoring local alignments: every global alignment of
    every pair of substrings, and the empty alignment."""
    outcomes = [(0, 0)]
    for a_start in range(len(a)):
        for a_end in range(a_start + 1, len(a) + 1):
            for b_start in range(len(b)):
                for b_end in range(b_start + 1, len(b) + 1):
                    outcomes += global_alignments(a[a_start:a_end], b[b_start:b_end])
    best = max(score for score, _ in outcomes)
    at_best = [identical for score, identical in outcomes if score == best]
    return min(at_best), max(at_best)


def random_protein(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(STANDARD) for _ in range(length))


def substitute(rng: random.Random, residues: str, positions) -> str:
    chars = list(residues)
    for position in positions:
        chars[position] = rng.choice([r for r in STANDARD if r != chars[position]])
    return "".join(chars)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def sft(residues: str, output: str, instruction: str = INSTRUCTION) -> dict:
    return {"instruction": instruction, "input": f"Sequence: {format_sequence(residues)}", "output": output}


# --- identity


def test_identity_matches_brute_force_including_ties():
    rng = random.Random(0)
    aligner = identity_aligner()
    tied_differently = 0
    for _ in range(300):
        # A small alphabet makes many co-optimal alignments, so the "most identities among them" rule matters.
        a = "".join(rng.choice("AGSTWU") for _ in range(rng.randint(1, 5)))
        b = "".join(rng.choice("AGSTWC") for _ in range(rng.randint(1, 5)))
        fewest, most = brute_force_identities(a, b)
        tied_differently += fewest != most
        assert identity(a, b, aligner) == most / min(len(a), len(b)), (a, b)
    assert tied_differently > 0  # the tie-break was exercised


def test_identity_is_realised_by_a_best_scoring_alignment():
    rng = random.Random(1)
    scaled = identity_aligner()
    plain = identity_aligner()
    plain.substitution_matrix = BLOSUM62
    plain.open_gap_score, plain.extend_gap_score = -11, -1
    for _ in range(20):
        a = random_protein(rng, rng.randint(20, 60))
        b = substitute(rng, a, rng.sample(range(len(a)), 8))[: rng.randint(15, len(a))] + random_protein(rng, 5)
        alignment = scaled.align(a, b)[0]
        same = sum(x == y and x != "-" for x, y in zip(alignment[0], alignment[1]))
        assert identity(a, b, scaled) == same / min(len(a), len(b))
        assert alignment.score // retrieval.ALIGNMENT_SCALE == plain.score(a, b)  # a best-scoring alignment


@pytest.mark.parametrize("k", [0, 1, 5, 10])
def test_k_substitutions_give_length_minus_k_over_length(k):
    rng = random.Random(k)
    protein = random_protein(rng, 50)
    mutant = substitute(rng, protein, range(2, 50, 5)[:k])
    assert identity(protein, mutant) == (50 - k) / 50
    assert identity(mutant, protein) == (50 - k) / 50


def test_identity_edge_cases():
    rng = random.Random(2)
    protein = random_protein(rng, 80)
    assert identity(protein, protein) == 1.0
    assert identity(protein[20:50], protein) == 1.0  # a fragment: divided by the shorter length
    first, second = random_protein(rng, 100), random_protein(rng, 100)
    assert identity(first, second) < 0.3
    assert identity(first, second) == identity(second, first)
    # A short protein placed anywhere along a long unrelated one buys no chance identity.
    assert identity(first, random_protein(rng, 1000)) < 0.3
    assert identity("MUO", "MUO") == 1.0  # residues BLOSUM62 lacks are scored through stand-ins
    assert identity("MUK", "MCK") == 2 / 3  # ... but U is not identical to C
    with pytest.raises(ValueError, match="non-empty"):
        identity("", "MK")


# --- training side


def test_load_training_proteins_merges_descriptions_and_counts_unreadable(tmp_path):
    p, q, r = "MKTAYIAKQR", "GSHMLEDPVV", "WWYFACDE"
    lines = [
        json.dumps(sft(p, "  first   description\n")),
        "{not json",
        json.dumps(sft("MKT", "bad") | {"input": "<seq> M K 1 </seq>"}),
        json.dumps({"instruction": INSTRUCTION, "input": format_sequence(q)}),  # no output
        json.dumps(sft(p, "second")),
        json.dumps({"instruction": "Do these bind?", "input": f"{format_sequence(p)} and {format_sequence(q)}", "output": "yes"}),
        json.dumps({"instruction": "Say hello.", "input": "", "output": "hello"}),  # no protein: ignored
    ]
    first = tmp_path / "train.jsonl"
    first.write_text("\n".join(lines) + "\n")
    second = tmp_path / "more.json"
    second.write_text(json.dumps([sft(r, "third")]))
    training = load_training_proteins([str(first), str(second)])
    assert training.residues == (p, q, r)
    assert training.descriptions == (frozenset({"first description", "second", "yes"}), frozenset({"yes"}), frozenset({"third"}))
    assert training.record_ids == ("train.jsonl:1", "train.jsonl:6", "more.json[0]")
    assert training.unreadable == 3
    with pytest.raises(FileNotFoundError):
        load_training_proteins([str(tmp_path / "missing.jsonl")])
    with pytest.raises(TypeError):
        load_training_proteins(str(first))


# --- the arm


@pytest.fixture
def mutated_set(tmp_path):
    """20 training proteins (4 descriptions x 5); held out: a 3-substitution copy of one protein per description,
    and one protein with a description no training protein carries. Every item shows all 5 descriptions."""
    rng = random.Random(3)
    descriptions = [f"The protein does thing number {d}." for d in range(4)]
    training, heldout, parents = [], [], []
    for d, description in enumerate(descriptions):
        for copy in range(5):
            protein = random_protein(rng, 60)
            # Extra whitespace: options are normalised, so the training side must be too.
            training.append(sft(protein, description.replace(" ", "   ") + "\n"))
            if copy == 0:
                parents.append((protein, f"train.jsonl:{len(training)}"))
                heldout.append(sft(substitute(rng, protein, [5, 25, 45]), description))
    heldout.append(sft(random_protein(rng, 60), "A description nobody was trained with."))
    train_path = write_jsonl(tmp_path / "train.jsonl", training)
    heldout_path = write_jsonl(tmp_path / "heldout.jsonl", heldout)
    benchmark = build_sequence_grounded(heldout_path, [train_path], num_options=5)
    assert not benchmark.flagged and len(benchmark.items) == 5
    return benchmark.items, load_training_proteins([train_path]), parents


def test_retrieval_finds_the_parent_of_each_mutant(mutated_set):
    items, training, parents = mutated_set
    predictions = retrieval_predictions(items, training, candidates=None)
    assert list(predictions) == [item.item_id for item in items]
    for item, (_, parent_record) in zip(items[:4], parents):
        prediction = predictions[item.item_id]
        assert set(prediction) == PREDICTION_KEYS
        assert prediction["predicted"] == item.answer and prediction["correct"] and not prediction["unparseable"]
        assert prediction["max_identity"] == 57 / 60
        assert prediction["scores"][item.answer - 1] == 57 / 60
        assert prediction["nearest_record"] == parent_record
        assert prediction["nearest_identity_option"] == item.answer
        assert prediction["probabilities"].index(max(prediction["probabilities"])) == item.answer - 1
        assert sum(prediction["probabilities"]) == pytest.approx(1.0)


def test_option_no_training_protein_carries_scores_minus_one(mutated_set):
    items, training, _ = mutated_set
    predictions = retrieval_predictions(items, training, candidates=None)
    for item in items:
        novel = [j for j, option in enumerate(item.options) if option_text(option).startswith("A description nobody")]
        assert len(novel) == 1
        prediction = predictions[item.item_id]
        assert prediction["scores"][novel[0]] == -1.0
        assert prediction["probabilities"][novel[0]] == 0.0
        assert all(0.0 <= s <= prediction["max_identity"] for j, s in enumerate(prediction["scores"]) if j != novel[0])
    novel_item = predictions[items[4].item_id]
    assert not novel_item["correct"] and novel_item["predicted"] is not None  # its own answer cannot be retrieved


def test_item_without_any_carried_option_predicts_none(tmp_path, mutated_set):
    _, training, _ = mutated_set
    rng = random.Random(4)
    heldout = [sft(random_protein(rng, 60), f"Unseen description {n}.") for n in range(3)]
    items = build_sequence_grounded(write_jsonl(tmp_path / "unseen.jsonl", heldout), num_options=3).items
    predictions = retrieval_predictions(items, training)
    for prediction in predictions.values():
        assert prediction["predicted"] is None and prediction["unparseable"] and not prediction["correct"]
        assert prediction["scores"] == [-1.0, -1.0, -1.0]
        assert prediction["probabilities"] == [1 / 3] * 3
        assert prediction["nearest_identity_option"] is None
        assert 0.0 <= prediction["max_identity"] < 0.5 and prediction["nearest_record"].startswith("train.jsonl:")


def test_prefilter_agrees_with_exhaustive_and_aligns_fewer(mutated_set, monkeypatch):
    items, training, _ = mutated_set
    exhaustive = retrieval_predictions(items, training, candidates=None)
    calls = []
    counting = retrieval.identity

    def counted(a, b, aligner=None):
        calls.append(b)
        return counting(a, b, aligner)

    monkeypatch.setattr(retrieval, "identity", counted)
    prefiltered = retrieval_predictions(items, training, candidates=2)
    assert len(calls) <= len(items) * (2 + 2 * 4)  # top 2 overall + top 2 of each carried option's 5 proteins
    assert len(calls) < len(items) * len(training.residues)
    for item in items:
        full, quick = exhaustive[item.item_id], prefiltered[item.item_id]
        assert all(q <= f for q, f in zip(quick["scores"], full["scores"]))  # fewer alignments: lower bounds
        assert quick["max_identity"] <= full["max_identity"]
    # The mutants have a true neighbour, which the prefilter must find; the novel protein's answer is a draw
    # among chance-level identities, where the prefilter may legitimately pick differently.
    for item in items[:4]:
        full, quick = exhaustive[item.item_id], prefiltered[item.item_id]
        for key in ("predicted", "max_identity", "nearest_record", "nearest_identity_option"):
            assert quick[key] == full[key], key
        assert quick["scores"][item.answer - 1] == full["scores"][item.answer - 1]
    with pytest.raises(ValueError, match="candidates"):
        retrieval_predictions(items, training, candidates=0)


def test_prefilter_ranks_a_mutated_copy_first():
    rng = random.Random(5)
    library = [random_protein(rng, rng.randint(100, 400)) for _ in range(300)]
    index = retrieval._KmerIndex.build(library)
    for parent in (17, 123, 250):
        mutant = substitute(rng, library[parent], rng.sample(range(len(library[parent])), len(library[parent]) // 4))
        mutant = mutant[:40] + "GGSGG" + mutant[40:]  # an insertion moves the rest onto another diagonal
        on_one_diagonal, shared = index.shared_kmers(mutant)
        top = retrieval._top(retrieval.np.arange(len(library)), on_one_diagonal, shared, 1)
        assert top.tolist() == [parent]


def test_shuffling_proteins_across_items_drops_accuracy(mutated_set):
    items, training, _ = mutated_set
    mutants = items[:4]
    shuffled = [replace(item, proteins=mutants[(n + 1) % 4].proteins) for n, item in enumerate(mutants)]
    accuracy = sum(p["correct"] for p in retrieval_predictions(mutants, training).values()) / 4
    ablated = sum(p["correct"] for p in retrieval_predictions(shuffled, training).values()) / 4
    assert (accuracy, ablated) == (1.0, 0.0)


def test_items_must_carry_a_protein(mutated_set):
    items, training, _ = mutated_set
    with pytest.raises(ValueError, match="holds no protein"):
        retrieval_predictions([replace(items[0], proteins=())], training)
    with pytest.raises(ValueError, match="twice"):
        retrieval_predictions([items[0], items[0]], training)


def test_summarise_identity_bins_and_quantiles():
    values = [0.1, 0.3, 0.45, 0.5, 0.69, 0.7, 1.0]
    summary = summarise_identity({str(n): {"max_identity": v} for n, v in enumerate(values)})
    assert summary == {
        "n": 7, "min": 0.1, "median": 0.5, "max": 1.0,
        "bins": {"<30%": 1, "30-50%": 2, "50-70%": 2, ">=70%": 2},
    }
    assert summarise_identity({})["median"] is None


def test_training_set_rejects_ragged_fields():
    with pytest.raises(ValueError, match="parallel"):
        TrainingSet(("MK",), (), ("r",))
