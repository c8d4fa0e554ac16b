"""A nearest-neighbour retrieval arm for the sequence-grounded benchmark, and how close each item is to training.

Published protein-to-text work found that nearest-neighbour retrieval beats fine-tuned LLMs on leaky splits,
so the report shows this arm: option n of an item scores the best sequence identity between the item's
protein (its first) and any training protein trained with option n's text; the prediction is the best option.
Every item also reports its highest identity to any training protein, so homology leakage is visible.

Sequence identity (`identity(a, b)`), exactly:
    local alignment (Smith-Waterman-Gotoh) with BLOSUM62 substitution scores (U scored as C, O as K) and
    a gap of n residues scoring -(11 + (n - 1)); among the alignments with the best score, the largest
    number of aligned pairs with the same letter; divided by the length of the shorter protein.
So it is identity times coverage of the shorter protein: identical proteins give 1.0, and so does a protein
contained in a longer one; two random proteins of uniform composition give ~0.05-0.25 whatever their
lengths (composition-biased ones more: the demo set's best chance hits reach ~0.45). (A global
alignment over the shorter length was rejected: placing a short protein anywhere along a long one buys
chance identities, so unrelated 100- and 1000-residue proteins score ~0.45 and leakage bins mean nothing.)
Biopython computes it in score-only mode, exactly: every score is multiplied by 2**20 and each same-letter
pair adds 1, so the best scaled score is 2**20 * (best score) + (most identities among best-scoring
alignments), and the identities are what is left after a floor division (every number is an integer far
below 2**53, so the floats are exact).

Prefilter (`candidates`, default `DEFAULT_CANDIDATES` = 50): training proteins are ranked by the most
3-mers they share with the item's protein on one diagonal (same offset in both), then by all shared 3-mer
position pairs, then by training order. Only the top `candidates` overall (for `max_identity`) and the top
`candidates` among the carriers of each option (for that option's score) are aligned; the rest are not.
What it can miss: a homolog whose identical residues seldom come three in a row (below ~35% identity few
3-mers match) or whose matches indels spread over many diagonals can rank below chance matches, and
low-complexity repeats can crowd the top. So with a prefilter, scores and `max_identity` are lower bounds of
the exhaustive ones, never higher. `candidates=None` aligns every training protein (exhaustive).

Probabilities: a softmax of the option identities divided by `PROBABILITY_TEMPERATURE` (0.05: 5 identity
points more is e times as likely); an option no training protein carries gets 0, and an item where no option
is carried (prediction None) gets uniform probabilities.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from Bio.Align import PairwiseAligner, substitution_matrices
from Bio.Align.substitution_matrices import Array

from ..data.records import RecordError, parse_record
from .benchmarks import BenchmarkItem, check_parallel, iter_training_records, option_text, prediction_record

DEFAULT_CANDIDATES = 50
PROBABILITY_TEMPERATURE = 0.05
ALIGNMENT_SCALE = 2**20  # must exceed any count of identities, i.e. the shorter protein's length
GAP_OPEN, GAP_EXTEND = 11, 1
KMER = 3
IDENTITY_BINS = (("<30%", 0.0, 0.3), ("30-50%", 0.3, 0.5), ("50-70%", 0.5, 0.7), (">=70%", 0.7, math.inf))
_ALPHABET = "ACDEFGHIKLMNPQRSTVWYBZXUO"  # protein_llava.sequences.RESIDUES
_BLOSUM_STAND_IN = {"U": "C", "O": "K"}  # BLOSUM62 has no row for selenocysteine or pyrrolysine
_LETTER_CODES = np.full(256, -1, dtype=np.int64)
_LETTER_CODES[np.frombuffer(_ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(len(_ALPHABET))
_LETTER_CODES.flags.writeable = False
_NUM_KMERS = len(_ALPHABET) ** KMER


@dataclass(frozen=True)
class TrainingSet:
    """Distinct training proteins in order of first appearance, each with what it was trained to say."""

    residues: tuple[str, ...]
    """Residues of each protein."""
    descriptions: tuple[frozenset[str], ...]
    """Per protein, the whitespace-normalised outputs of every record it occurs in (empty for text records)."""
    record_ids: tuple[str, ...]
    """Per protein, the record it first occurs in (`file:line` or `file[index]`)."""
    unreadable: int = 0
    """Records skipped because they could not be read or parsed."""

    def __post_init__(self):
        check_parallel(residues=self.residues, descriptions=self.descriptions, record_ids=self.record_ids)
        if not self.residues:
            raise ValueError("a training set needs at least one protein")


def load_training_proteins(paths: Sequence[str]) -> TrainingSet:
    """Every protein of the training files (ProteinLMDataset formats), with its descriptions and first record id.

    A record's descriptions are its assistant turns as `" ".join(text.split())`, as the sequence-grounded
    items write their options; every protein of the record gets them. Unreadable records are counted.
    """
    where: dict[str, int] = {}
    residues: list[str] = []
    descriptions: list[set[str]] = []
    record_ids: list[str] = []
    unreadable = 0
    for record_id, raw in iter_training_records(paths):
        try:
            if isinstance(raw, RecordError):
                raise raw
            conversation = parse_record(raw, record_id)
        except RecordError:
            unreadable += 1
            continue
        outputs = {" ".join(turn.content.split()) for turn in conversation.turns if turn.role == "assistant"}
        for protein in conversation.proteins:
            if protein not in where:
                where[protein] = len(residues)
                residues.append(protein)
                descriptions.append(set())
                record_ids.append(record_id)
            descriptions[where[protein]] |= outputs
    if not residues:
        raise ValueError(f"no proteins in the training files {list(paths)} ({unreadable} unreadable records)")
    return TrainingSet(tuple(residues), tuple(frozenset(d) for d in descriptions), tuple(record_ids), unreadable)


# --- identity


def identity_aligner() -> PairwiseAligner:
    """The aligner whose score encodes `identity` (see the module docstring): scaled BLOSUM62 plus 1 per identity."""
    blosum62 = substitution_matrices.load("BLOSUM62")
    matrix = Array(alphabet=_ALPHABET, dims=2)
    for x in _ALPHABET:
        for y in _ALPHABET:
            score = blosum62[_BLOSUM_STAND_IN.get(x, x), _BLOSUM_STAND_IN.get(y, y)]
            matrix[x, y] = score * ALIGNMENT_SCALE + (x == y)
    aligner = PairwiseAligner()
    aligner.mode = "local"
    aligner.substitution_matrix = matrix
    aligner.open_gap_score = -GAP_OPEN * ALIGNMENT_SCALE
    aligner.extend_gap_score = -GAP_EXTEND * ALIGNMENT_SCALE
    return aligner


def identity(a: str, b: str, aligner: PairwiseAligner | None = None) -> float:
    """Sequence identity of two proteins as the module docstring defines it; `aligner` from `identity_aligner()`."""
    shorter = min(len(a), len(b))
    if shorter == 0:
        raise ValueError("identity needs two non-empty proteins")
    if shorter >= ALIGNMENT_SCALE:
        raise ValueError(f"proteins of {shorter} residues are too long for ALIGNMENT_SCALE {ALIGNMENT_SCALE}")
    scaled = (aligner or identity_aligner()).score(a, b)
    identical = scaled - math.floor(scaled / ALIGNMENT_SCALE) * ALIGNMENT_SCALE
    return int(identical) / shorter


# --- k-mer prefilter


def _kmer_codes(residues: str) -> np.ndarray:
    """(len - KMER + 1,) integer code of each window of KMER residues."""
    letters = _LETTER_CODES[np.frombuffer(residues.encode("ascii"), dtype=np.uint8)]
    windows = len(letters) - KMER + 1
    if windows <= 0:
        return np.empty(0, dtype=np.int64)
    codes = np.zeros(windows, dtype=np.int64)
    for offset in range(KMER):
        codes = codes * len(_ALPHABET) + letters[offset : offset + windows]
    return codes


@dataclass(frozen=True)
class _KmerIndex:
    """Every k-mer window of the training proteins, sorted by k-mer code."""

    starts: np.ndarray  # (_NUM_KMERS + 1,): windows of code c are [starts[c], starts[c + 1])
    protein: np.ndarray  # (num windows,) training protein of each window
    position: np.ndarray  # (num windows,) where the window starts in its protein
    num_proteins: int
    max_length: int

    @classmethod
    def build(cls, residues: Sequence[str]) -> _KmerIndex:
        codes = [_kmer_codes(r) for r in residues]
        sizes = [len(c) for c in codes]
        all_codes = np.concatenate(codes)
        order = np.argsort(all_codes, kind="stable")
        return cls(
            starts=np.searchsorted(all_codes[order], np.arange(_NUM_KMERS + 1)),
            protein=np.repeat(np.arange(len(residues)), sizes)[order],
            position=np.concatenate([np.arange(size) for size in sizes])[order],
            num_proteins=len(residues),
            max_length=max(len(r) for r in residues),
        )

    def shared_kmers(self, residues: str) -> tuple[np.ndarray, np.ndarray]:
        """(num_proteins,) twice: most k-mers shared with `residues` on one diagonal; all shared window pairs."""
        codes = _kmer_codes(residues)
        first, counts = self.starts[codes], self.starts[codes + 1] - self.starts[codes]
        total = int(counts.sum())
        if total == 0:
            return np.zeros(self.num_proteins, np.int64), np.zeros(self.num_proteins, np.int64)
        # (total,) every (query window, training window) pair with the same k-mer, query window by window
        matches = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(total)
        proteins = self.protein[matches]
        diagonals = np.repeat(np.arange(len(codes)), counts) - self.position[matches] + self.max_length  # >= 0
        width = self.max_length + len(codes) + 1
        keys, per_diagonal = np.unique(proteins * width + diagonals, return_counts=True)
        on_one_diagonal = np.zeros(self.num_proteins, np.int64)
        np.maximum.at(on_one_diagonal, keys // width, per_diagonal)
        return on_one_diagonal, np.bincount(proteins, minlength=self.num_proteins)


def _top(among: np.ndarray, on_one_diagonal: np.ndarray, shared: np.ndarray, count: int) -> np.ndarray:
    """The `count` proteins of `among` the prefilter ranks first (ties: training order)."""
    order = np.lexsort((among, -shared[among], -on_one_diagonal[among]))
    return among[order[:count]]


# --- the arm


def retrieval_predictions(
    items: Sequence[BenchmarkItem],
    training: TrainingSet,
    candidates: int | None = DEFAULT_CANDIDATES,
    progress: bool = False,
) -> dict[str, dict]:
    """Per item id, the retrieval arm's prediction dict (`benchmarks.prediction_record`'s keys plus scores,
    probabilities, max_identity, nearest_record, nearest_identity_option); `candidates=None` is exhaustive."""
    if candidates is not None and candidates < 1:
        raise ValueError(f"candidates must be >= 1 or None (exhaustive), got {candidates}")
    carriers: dict[str, list[int]] = {}
    for index, descriptions in enumerate(training.descriptions):
        for description in descriptions:
            carriers.setdefault(description, []).append(index)
    carrier_arrays = {text: np.array(indices) for text, indices in carriers.items()}
    no_carrier = np.empty(0, dtype=np.int64)
    everyone = np.arange(len(training.residues))
    kmer_index = _KmerIndex.build(training.residues) if candidates is not None else None
    aligner = identity_aligner()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="retrieval", unit="item")
    predictions: dict[str, dict] = {}
    for item in items:
        if item.item_id in predictions:
            raise ValueError(f"item id {item.item_id!r} occurs twice")
        if not item.proteins:
            raise ValueError(f"item {item.item_id!r} holds no protein: the retrieval arm needs one")
        query = item.proteins[0]
        texts = [" ".join(option_text(option).split()) for option in item.options]
        groups = [carrier_arrays.get(text, no_carrier) for text in texts]
        if kmer_index is None:
            to_align = everyone
        else:
            on_one_diagonal, shared = kmer_index.shared_kmers(query)
            picked = [_top(everyone, on_one_diagonal, shared, candidates)]
            picked += [_top(group, on_one_diagonal, shared, candidates) for group in groups]
            to_align = np.unique(np.concatenate(picked))
        identities = {int(t): identity(query, training.residues[t], aligner) for t in to_align}
        scores = [max((identities[int(t)] for t in group if int(t) in identities), default=-1.0) for group in groups]
        nearest = min(identities, key=lambda t: (-identities[t], t))
        predictions[item.item_id] = _prediction(item, texts, scores, training, nearest, identities[nearest])
    return predictions


def _prediction(
    item: BenchmarkItem, texts: list[str], scores: list[float], training: TrainingSet, nearest: int, max_identity: float
) -> dict:
    carried = [j for j, score in enumerate(scores) if score >= 0.0]
    # ties → lowest number, as the runner does; no carried option → None (counted unparseable, never a default)
    predicted = max(carried, key=lambda j: scores[j]) + 1 if carried else None
    if carried:
        top = max(scores[j] for j in carried)
        weights = [math.exp((s - top) / PROBABILITY_TEMPERATURE) if s >= 0.0 else 0.0 for s in scores]
    else:
        weights = [1.0] * len(scores)
    matching = [j + 1 for j, text in enumerate(texts) if text in training.descriptions[nearest]]
    return prediction_record(
        item,
        predicted,
        scores=scores,
        probabilities=[w / sum(weights) for w in weights],
        max_identity=max_identity,
        nearest_record=training.record_ids[nearest],
        nearest_identity_option=matching[0] if matching else None,
    )


def summarise_identity(predictions: Mapping[str, dict]) -> dict:
    """Distribution of the items' `max_identity`: n, min, median, max (None when empty) and counts per bin."""
    values = sorted(p["max_identity"] for p in predictions.values())
    bins = {name: sum(low <= v < high for v in values) for name, low, high in IDENTITY_BINS}
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None, "bins": bins}
    return {"n": len(values), "min": values[0], "median": statistics.median(values), "max": values[-1], "bins": bins}


__all__ = [
    "DEFAULT_CANDIDATES",
    "TrainingSet",
    "identity",
    "identity_aligner",
    "load_training_proteins",
    "retrieval_predictions",
    "summarise_identity",
]
