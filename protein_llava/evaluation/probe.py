"""A linear-probe arm: what a linear read-out of the frozen encoder's pooled features answers.

It separates "the encoder's features do not carry the answer" from "the projector and decoder do not read
it": if the probe answers a question type well above chance and falls to chance when the proteins are
swapped, the answer is linearly there in what the projector receives.

Features: per protein, the mean over its residues (no `<cls>`, `<eos>` or padding) of the encoder's
representation at its `repr_layer`, i.e. the vectors the projector reads, computed in eval mode without
gradients, in batches, as float32. Proteins over the encoder's `max_residues` are cut to that many.

Classifier: one per question type (the record's `subset`, an item's `category`), fit on every training record
of that type: the first protein's features → the record's output text (whitespace-normalised, as options are
written). `StandardScaler` then `LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)` (lbfgs, multinomial,
deterministic). A type with a single training class always predicts it.

Answer: option j scores log P(class = option j's text); a text the probe never saw as a class of the item's
type scores -inf (written as null in `scores`). The prediction is the best option (ties: lowest number);
an item with no known option (or a type absent from training) gets None, counted unparseable like the
retrieval arm's. `probabilities` renormalise P over the known options (uniform when none is known).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ..data.records import RecordError
from ..model.encoder import ProteinEncoder, esm2_alphabet
from .benchmarks import (
    BenchmarkItem, ItemError, check_parallel, iter_training_records, option_text, prediction_record, read_sft_record,
)

PROBE_C = 1.0
"""Inverse L2 strength of the logistic regression (scikit-learn's default)."""
PROBE_MAX_ITER = 2000
"""lbfgs iterations; standardised features converge in far fewer on the demo set."""
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class LabelledProteins:
    """Training records as (protein, question type, answer text) triples, parallel tuples in file order."""

    residues: tuple[str, ...]
    """The record's first protein."""
    question_types: tuple[str, ...]
    """The record's `subset` ("" when it has none)."""
    labels: tuple[str, ...]
    """The record's output, whitespace-normalised."""
    skipped: int = 0
    """Records left out: unreadable, not flat SFT, or holding no protein."""

    def __post_init__(self):
        check_parallel(residues=self.residues, question_types=self.question_types, labels=self.labels)
        if not self.residues:
            raise ValueError("the probe needs at least one labelled training protein")


def load_labelled_proteins(paths: Sequence[str]) -> LabelledProteins:
    """Every flat SFT record with a protein in the training files (as the sequence-grounded items read them)."""
    residues, types, labels, skipped = [], [], [], 0
    for record_id, raw in iter_training_records(paths):
        try:
            if isinstance(raw, RecordError):
                raise raw
            record = read_sft_record(raw, record_id)
        except (RecordError, ItemError):
            skipped += 1
            continue
        residues.append(record.proteins[0])
        types.append(record.subset)
        labels.append(record.output)
    if not residues:
        raise ValueError(f"no labelled proteins in the training files {list(paths)} ({skipped} records skipped)")
    return LabelledProteins(tuple(residues), tuple(types), tuple(labels), skipped)


@torch.no_grad()
def pooled_features(
    encoder: ProteinEncoder, proteins: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """(len(proteins), D) float32: each protein's mean residue representation at the encoder's `repr_layer`.

    Runs on the encoder's device and dtype in eval mode (its train/eval mode is restored afterwards).
    """
    return pooled_features_by_layer(encoder, proteins, [encoder.repr_layer], batch_size)[encoder.repr_layer]


@torch.no_grad()
def pooled_features_by_layer(
    encoder: ProteinEncoder, proteins: Sequence[str], layers: Sequence[int], batch_size: int = DEFAULT_BATCH_SIZE
) -> dict[int, np.ndarray]:
    """`pooled_features` at each of `layers` (fair-esm indices, 0 = embeddings), from one encoder pass."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    alphabet = esm2_alphabet()
    limit = encoder.config.max_residues
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = {layer: np.zeros((len(proteins), encoder.embed_dim), dtype=np.float32) for layer in layers}
    order = sorted(range(len(proteins)), key=lambda i: len(proteins[i]))  # similar lengths batch together
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            chunk = [proteins[i][:limit] for i in rows]
            tokens = torch.full((len(chunk), max(map(len, chunk)) + 2), alphabet.padding_idx, dtype=torch.long)
            for row, residues in enumerate(chunk):
                ids = [alphabet.cls_idx, *(alphabet.tok_to_idx[r] for r in residues), alphabet.eos_idx]
                tokens[row, : len(ids)] = torch.tensor(ids)
            by_layer, mask = encoder.layer_representations(tokens.to(device), list(layers))  # each (n, longest, D)
            weights = mask.to(by_layer[layers[0]].dtype).unsqueeze(-1)
            for layer, features in by_layer.items():
                means = (features * weights).sum(1) / weights.sum(1)  # (n, D)
                out[layer][rows] = means.float().cpu().numpy()
    finally:
        encoder.train(was_training)
    return out


class LinearProbe:
    """Per question type, a standardised logistic regression from pooled encoder features to answer texts.

    Build with `LinearProbe.fit(encoder, training)`; `predictions(items)` answers benchmark items. Features
    of every protein seen are kept, so scoring the ablated items reuses the held-out proteins' features.
    """

    def __init__(self, encoder: ProteinEncoder, batch_size: int = DEFAULT_BATCH_SIZE):
        self.encoder = encoder
        self.batch_size = batch_size
        self.classifiers: dict[str, Pipeline | str] = {}  # a fitted pipeline, or the single class of a type
        self.num_training = 0
        self._features: dict[str, np.ndarray] = {}

    @classmethod
    def fit(
        cls, encoder: ProteinEncoder, training: LabelledProteins, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> LinearProbe:
        """One classifier per question type of `training` on `encoder`'s pooled features."""
        probe = cls(encoder, batch_size)
        features = probe.features(training.residues)
        types = np.array(training.question_types)
        labels = np.array(training.labels, dtype=object)
        for question_type in sorted(set(training.question_types)):
            chosen = types == question_type
            classes = sorted(set(labels[chosen]))
            if len(classes) == 1:
                probe.classifiers[question_type] = classes[0]
                continue
            pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))
            probe.classifiers[question_type] = pipeline.fit(features[chosen], labels[chosen])
        probe.num_training = len(training.residues)
        return probe

    def features(self, proteins: Sequence[str]) -> np.ndarray:
        """(len(proteins), D) pooled features, computing those of proteins not seen before."""
        missing = sorted({p for p in proteins if p not in self._features})
        if missing:
            for protein, row in zip(missing, pooled_features(self.encoder, missing, self.batch_size)):
                self._features[protein] = row
        if not proteins:
            return np.zeros((0, self.encoder.embed_dim), np.float32)
        return np.stack([self._features[p] for p in proteins])

    def class_log_probabilities(self, question_type: str, features: np.ndarray) -> list[dict[str, float]]:
        """Per row of `features`, {class text: log P} of the type's classifier ([{}] rows for an unseen type)."""
        classifier = self.classifiers.get(question_type)
        if classifier is None:
            return [{} for _ in range(len(features))]
        if isinstance(classifier, str):
            return [{classifier: 0.0} for _ in range(len(features))]
        # log_softmax of the logits, not log(predict_proba): a saturated probability of 0 must stay finite,
        # since -inf is kept for classes the probe never saw.
        logits = classifier.decision_function(features)  # (n, classes), or (n,) for two classes
        if logits.ndim == 1:
            logits = np.stack([np.zeros_like(logits), logits], axis=1)  # P(classes_[1]) = sigmoid(logit)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # log_softmax over classes
        classes = list(classifier.classes_)
        return [dict(zip(classes, map(float, row))) for row in log_p]

    def predictions(self, items: Sequence[BenchmarkItem]) -> dict[str, dict]:
        """Per item id, the probe's prediction dict (`benchmarks.prediction_record`'s keys plus scores,
        probabilities, question_type_known)."""
        for item in items:
            if not item.proteins:
                raise ValueError(f"item {item.item_id!r} holds no protein: the probe arm needs one")
        features = self.features([item.proteins[0] for item in items])
        by_type: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_type.setdefault(item.category, []).append(index)
        log_p: list[dict[str, float]] = [{} for _ in items]
        for question_type, indices in by_type.items():
            for index, row in zip(indices, self.class_log_probabilities(question_type, features[indices])):
                log_p[index] = row
        predictions: dict[str, dict] = {}
        for item, row in zip(items, log_p):
            if item.item_id in predictions:
                raise ValueError(f"item id {item.item_id!r} occurs twice")
            texts = [" ".join(option_text(option).split()) for option in item.options]
            scores = [row.get(text, -math.inf) for text in texts]
            predictions[item.item_id] = _prediction(item, scores, item.category in self.classifiers)
        return predictions


def _prediction(item: BenchmarkItem, scores: list[float], type_known: bool) -> dict:
    known = [j for j, score in enumerate(scores) if score > -math.inf]
    predicted = max(known, key=lambda j: scores[j]) + 1 if known else None  # ties → lowest number
    if known:
        top = max(scores[j] for j in known)
        weights = [math.exp(s - top) for s in scores]  # exp(-inf) = 0
    else:
        weights = [1.0] * len(scores)
    return prediction_record(
        item,
        predicted,
        scores=[s if s > -math.inf else None for s in scores],  # null = a class the probe never saw (-inf)
        probabilities=[w / sum(weights) for w in weights],
        question_type_known=type_known,
    )


def probe_predictions(
    encoder: ProteinEncoder,
    training: LabelledProteins,
    items: Sequence[BenchmarkItem],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, dict]:
    """Fit the probe on `training` with `encoder`'s features and answer `items` (see the module docstring)."""
    return LinearProbe.fit(encoder, training, batch_size).predictions(items)


__all__ = [
    "PROBE_C",
    "PROBE_MAX_ITER",
    "LabelledProteins",
    "LinearProbe",
    "load_labelled_proteins",
    "pooled_features",
    "probe_predictions",
]
