"""Tests for protein_llava.evaluation.probe: the linear probe on frozen, mean-pooled encoder features reads a
planted label, falls to chance when the proteins are swapped, ranks only classes it saw, and its features are
the residues' mean (no <cls>, <eos> or padding)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from protein_llava.model.configuration import ProteinLLMConfig
from protein_llava.data.demo import write_demo_dataset
from protein_llava.model.encoder import ProteinEncoder, esm2_alphabet
from protein_llava.evaluation.benchmarks import BenchmarkItem, ablate_proteins, build_sequence_grounded
from protein_llava.evaluation.probe import (
    LabelledProteins,
    LinearProbe,
    load_labelled_proteins,
    pooled_features,
    pooled_features_by_layer,
    probe_predictions,
)
from protein_llava.evaluation.report import accuracy_by_type

PREDICTION_KEYS = {"item_id", "num_options", "answer", "predicted", "correct", "unparseable", "scores", "probabilities", "question_type_known"}


def tiny_encoder(seed: int = 0) -> ProteinEncoder:
    """The tiny preset's random 2-layer, 32-wide ESM-2."""
    torch.manual_seed(seed)
    return ProteinEncoder(ProteinLLMConfig.from_preset("tiny").encoder_config).eval()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo set (240 training proteins, 40 held out) as 4-option items, swapped items, and the probe fit on it."""
    paths = write_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=240, num_heldout=40, seed=0)
    items = build_sequence_grounded(str(paths["heldout"]), [str(paths["train"])], num_options=4, seed=0).items
    training = load_labelled_proteins([str(paths["train"])])
    probe = LinearProbe.fit(tiny_encoder(), training)
    return items, ablate_proteins(items, seed=0), training, probe


def test_training_labels_are_each_records_output_by_question_type(demo, tmp_path):
    _, _, training, _ = demo
    assert len(training.residues) == 240 * 4 and training.skipped == 0
    assert set(training.question_types) == {"function", "enriched_residue", "net_charge", "length"}
    assert len({label for label, kind in zip(training.labels, training.question_types) if kind == "length"}) == 4
    records = [
        {"instruction": "Q?", "input": "<seq> M K T </seq>", "output": "  It is   short. ", "subset": "length"},
        {"instruction": "Q?", "input": "no protein here", "output": "x"},
        {"conversations": [{"from": "human", "value": "hi"}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    loaded = load_labelled_proteins([str(path)])
    assert (loaded.residues, loaded.question_types, loaded.labels, loaded.skipped) == (("MKT",), ("length",), ("It is short.",), 3)
    with pytest.raises(TypeError, match="single path"):
        load_labelled_proteins(str(path))


def test_probe_reads_the_planted_residue_and_falls_to_chance_when_swapped(demo):
    items, ablated, _, probe = demo
    accuracy = accuracy_by_type(items, probe.predictions(items))
    swapped = accuracy_by_type(ablated, probe.predictions(ablated))
    # The enriched residue is 20 % of the protein: its share moves the mean-pooled features along one direction.
    assert accuracy["enriched_residue"]["n"] == 40
    assert accuracy["enriched_residue"]["accuracy"] >= 0.8, accuracy
    assert swapped["enriched_residue"]["accuracy"] <= 0.45, swapped
    assert accuracy["all"]["accuracy"] > swapped["all"]["accuracy"] + 0.2


def test_predictions_have_the_arms_shape(demo):
    items, _, training, probe = demo
    predictions = probe.predictions(items)
    assert list(predictions) == [item.item_id for item in items]
    for item in items:
        prediction = predictions[item.item_id]
        assert set(prediction) == PREDICTION_KEYS
        assert prediction["predicted"] in range(1, 5) and prediction["correct"] == (prediction["predicted"] == item.answer)
        assert len(prediction["scores"]) == len(prediction["probabilities"]) == 4
        assert sum(prediction["probabilities"]) == pytest.approx(1.0)
        # Every held-out option text is a class of its type in training, so every option has a finite score.
        assert all(s is not None and s <= 0.0 for s in prediction["scores"])
    # The one-call form fits the same classifiers (lbfgs is deterministic).
    again = probe_predictions(tiny_encoder(), training, items[:8])
    assert [again[i.item_id]["predicted"] for i in items[:8]] == [predictions[i.item_id]["predicted"] for i in items[:8]]


def test_unseen_classes_and_types_are_never_chosen():
    encoder = tiny_encoder()
    proteins = ["MKTAYIAKQR", "GGGGSGGGGS", "DEDEDEDEKK", "LLLLIVVAAF"]
    training = LabelledProteins(tuple(proteins), ("colour",) * 3 + ("shape",), ("red", "blue", "red", "round"))
    probe = LinearProbe.fit(encoder, training)
    options = ("option 1: green", "option 2: blue", "option 3: red")
    items = [
        BenchmarkItem("colour", "q", options, 3, (proteins[0],), category="colour"),
        BenchmarkItem("only-unseen", "q", ("option 1: green", "option 2: purple"), 1, (proteins[1],), category="colour"),
        BenchmarkItem("one-class", "q", ("option 1: square", "option 2: round"), 2, (proteins[2],), category="shape"),
        BenchmarkItem("no-type", "q", options, 1, (proteins[3],), category="taste"),
    ]
    predictions = probe.predictions(items)
    colour = predictions["colour"]
    assert colour["scores"][0] is None and colour["probabilities"][0] == 0.0 and colour["predicted"] in (2, 3)
    assert math.isclose(math.exp(colour["scores"][1]) + math.exp(colour["scores"][2]), 1.0, rel_tol=1e-6)
    assert predictions["only-unseen"]["predicted"] is None and predictions["only-unseen"]["unparseable"]
    assert predictions["only-unseen"]["probabilities"] == [0.5, 0.5]
    assert predictions["one-class"]["predicted"] == 2 and predictions["one-class"]["scores"] == [None, 0.0]
    assert predictions["no-type"]["predicted"] is None and not predictions["no-type"]["question_type_known"]
    with pytest.raises(ValueError, match="holds no protein"):
        probe.predictions([BenchmarkItem("none", "q", options, 1, ())])


def test_features_are_the_mean_over_residues_only():
    encoder = tiny_encoder().train()
    proteins = ["MKTAYIAKQRQISFVKSHFSRQ", "GSG", "MKTAYIAK"]
    features = pooled_features(encoder, proteins, batch_size=3)  # padded together in one batch
    assert features.shape == (3, 32) and features.dtype == np.float32
    assert encoder.training  # its mode is restored
    alphabet = esm2_alphabet()
    encoder.eval()
    with torch.no_grad():
        for row, residues in enumerate(proteins):
            tokens = torch.tensor([[alphabet.cls_idx, *(alphabet.tok_to_idx[r] for r in residues), alphabet.eos_idx]])
            every_position = encoder.esm(tokens, repr_layers=[encoder.repr_layer])["representations"][encoder.repr_layer][0]
            expected = every_position[1 : 1 + len(residues)].mean(0)  # (D,) residues only, no <cls> / <eos>
            assert np.allclose(features[row], expected.numpy(), atol=1e-5), row
            assert not np.allclose(features[row], every_position.mean(0).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pooled_features(encoder, proteins, batch_size=0)


def test_every_layer_from_one_pass_equals_each_layer_read_alone():
    encoder = tiny_encoder()
    proteins = ["MKTAYIAKQRQISFVKSHFSRQ", "GSG", "MKTAYIAK"]
    by_layer = pooled_features_by_layer(encoder, proteins, [0, 1, 2], batch_size=2)
    for layer in (0, 1, 2):
        encoder.repr_layer = layer
        assert np.array_equal(by_layer[layer], pooled_features(encoder, proteins, batch_size=2)), layer
    assert not np.allclose(by_layer[1], by_layer[2])
