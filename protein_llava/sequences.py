"""Protein sequences in text: validation, normalisation and ProteinLMDataset's `<seq> ... </seq>` form."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

# The 20 standard residues plus the ambiguity / rare codes ESM-2's alphabet has tokens for:
# X (any), B (D or N), Z (E or Q), U (selenocysteine), O (pyrrolysine).
RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWY" + "XBUZO")
SEQ_OPEN, SEQ_CLOSE = "<seq>", "</seq>"
OverflowPolicy = Literal["error", "truncate"]
_TAG = re.compile(r"</?seq>", re.IGNORECASE)


class ProteinSequenceError(ValueError):
    """A protein sequence or `<seq>` markup that cannot be used; the message names what and where."""


def _where(record: str | None) -> str:
    return f" in {record}" if record else ""


def normalize_sequence(sequence: str, record: str | None = None) -> str:
    """Upper-case residues with whitespace removed; anything outside `RESIDUES` raises.

    `record` names the sample in messages (e.g. "record 17" or "sample 2, protein 1").
    The position in the message counts residues from 1, ignoring whitespace.
    """
    residues = "".join(sequence.split()).upper()
    if not residues:
        raise ProteinSequenceError(f"empty protein sequence{_where(record)}")
    for position, char in enumerate(residues, start=1):
        if char not in RESIDUES:
            hint = ""
            if char == "*":
                hint = " ('*' marks a stop codon: remove it)"
            elif char in "-.":
                hint = " (alignment gaps are not residues: remove them)"
            elif char.isdigit():
                hint = " (digits are not residues: remove numbering)"
            raise ProteinSequenceError(
                f"invalid residue {char!r} at position {position}{_where(record)}{hint}; "
                f"allowed: the 20 standard amino acids and X B U Z O"
            )
    return residues


def fit_to_limit(residues: str, max_residues: int, overflow: OverflowPolicy, record: str | None = None) -> str:
    """Apply the length policy: "error" raises, "truncate" keeps the first `max_residues` with a warning."""
    if len(residues) <= max_residues:
        return residues
    if overflow == "error":
        raise ProteinSequenceError(
            f"protein of {len(residues)} residues{_where(record)} is longer than the encoder's limit of "
            f"{max_residues}; shorten it or set overflow='truncate'"
        )
    if overflow == "truncate":
        warnings.warn(
            f"protein{_where(record)} truncated from {len(residues)} to {max_residues} residues "
            f"(residues {max_residues + 1}-{len(residues)} were cut)",
            stacklevel=3,
        )
        return residues[:max_residues]
    raise ValueError(f"unknown overflow policy {overflow!r}; choose 'error' or 'truncate'")


@dataclass(frozen=True)
class SeqSpan:
    """One `<seq> ... </seq>` span of a text: character offsets of the whole span and its inner text."""

    start: int
    end: int
    inner: str


def find_seq_spans(text: str, record: str | None = None) -> list[SeqSpan]:
    """Every `<seq> ... </seq>` span, in order; unbalanced or nested tags raise, naming the offset."""
    spans, open_at = [], None
    for match in _TAG.finditer(text):
        is_close = match.group().startswith("</")
        if not is_close:
            if open_at is not None:
                raise ProteinSequenceError(
                    f"nested {SEQ_OPEN} at character {match.start()}{_where(record)} "
                    f"(the {SEQ_OPEN} at character {open_at} is not closed)"
                )
            open_at = match.start()
        else:
            if open_at is None:
                raise ProteinSequenceError(
                    f"{SEQ_CLOSE} at character {match.start()}{_where(record)} has no {SEQ_OPEN} before it"
                )
            inner_start = open_at + len(SEQ_OPEN)
            spans.append(SeqSpan(open_at, match.end(), text[inner_start : match.start()]))
            open_at = None
    if open_at is not None:
        raise ProteinSequenceError(f"{SEQ_OPEN} at character {open_at}{_where(record)} is never closed")
    return spans


def format_sequence(residues: str) -> str:
    """ProteinLMDataset's inline text form: `<seq> M K T ... </seq>`."""
    return f"{SEQ_OPEN} {' '.join(residues)} {SEQ_CLOSE}"
