"""Protein sequences in text: validation, normalisation and ProteinLMDataset's `<seq> ... </seq>` form.

`check_sequence` is the one validation policy (normalise, then the encoder's length limit) every caller
applies; its failures are `ProteinSequenceError`s carrying a `SequenceReason`, the code that run reports,
`*.errors.jsonl` files and HTTP rejections show.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from .constants import SEQ_CLOSE, SEQ_OPEN

# The 20 standard residues plus the ambiguity / rare codes ESM-2's alphabet has tokens for:
# X (any), B (D or N), Z (E or Q), U (selenocysteine), O (pyrrolysine).
RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWY" + "XBUZO")
OverflowPolicy = Literal["error", "truncate"]
_TAG = re.compile(r"</?seq>", re.IGNORECASE)


class SequenceReason(str, Enum):  # enum.StrEnum once Python 3.10 support goes
    """Why a protein (or its markup) cannot be used. The values are public codes: they are the strings
    written to reports, `*.errors.jsonl` and HTTP rejections, so renaming one is a breaking change."""

    EMPTY = "empty_sequence"
    """No residues at all (only whitespace)."""
    INVALID_RESIDUE = "invalid_residue"
    """A character outside `RESIDUES` (a stop codon, a gap, a digit ...)."""
    TOO_LONG = "too_long_protein"
    """More residues than the encoder takes, under overflow="error"."""
    BAD_MARKUP = "bad_markup"
    """Unbalanced or nested `<seq>` tags, or `<protein>` markers that do not match the proteins given."""

    def __str__(self) -> str:
        return self.value


class ProteinSequenceError(ValueError):
    """A protein sequence or `<seq>` markup that cannot be used; `reason` says why, the message what and where."""

    def __init__(self, reason: SequenceReason, message: str):
        super().__init__(message)
        self.reason = SequenceReason(reason)

    def __reduce__(self):
        # Exceptions pickle through their args (the message alone); DataLoader workers and multiprocessing need both.
        return type(self), (self.reason, str(self))


def _where(record: str | None) -> str:
    return f" in {record}" if record else ""


def normalize_sequence(sequence: str, record: str | None = None) -> str:
    """Upper-case residues with whitespace removed; anything outside `RESIDUES` raises.

    `record` names the sample in messages (e.g. "record 17" or "sample 2, protein 1").
    The position in the message counts residues from 1, ignoring whitespace.
    """
    residues = "".join(sequence.split()).upper()
    if not residues:
        raise ProteinSequenceError(SequenceReason.EMPTY, f"empty protein sequence{_where(record)}")
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
                SequenceReason.INVALID_RESIDUE,
                f"invalid residue {char!r} at position {position}{_where(record)}{hint}; "
                f"allowed: the 20 standard amino acids and X B U Z O"
            )
    return residues


@dataclass(frozen=True)
class CheckedSequence:
    """A protein that passed `check_sequence`: its residues (cut to the limit under overflow="truncate") and
    how many residues it had before."""

    residues: str
    length: int

    @property
    def truncated(self) -> bool:
        return len(self.residues) < self.length


def check_sequence(
    sequence: str,
    max_residues: int,
    overflow: OverflowPolicy = "error",
    record: str | None = None,
    warn: bool = True,
) -> CheckedSequence:
    """Normalise `sequence` (see `normalize_sequence`) and apply the encoder's length policy.

    Over `max_residues`, overflow="error" raises (reason `TOO_LONG`) and "truncate" keeps the first
    `max_residues` residues, with a warning unless `warn=False` (for callers that report truncation in
    their own output). Every failure is a `ProteinSequenceError` whose `reason` is a `SequenceReason`.
    """
    if overflow not in ("error", "truncate"):
        raise ValueError(f"unknown overflow policy {overflow!r}; choose 'error' or 'truncate'")
    residues = normalize_sequence(sequence, record)
    if len(residues) <= max_residues:
        return CheckedSequence(residues, len(residues))
    if overflow == "error":
        raise ProteinSequenceError(
            SequenceReason.TOO_LONG,
            f"protein of {len(residues)} residues{_where(record)} is longer than the encoder's limit of "
            f"{max_residues}; shorten it or set overflow='truncate'",
        )
    if warn:
        warnings.warn(
            f"protein{_where(record)} truncated from {len(residues)} to {max_residues} residues "
            f"(residues {max_residues + 1}-{len(residues)} were cut)",
            stacklevel=2,
        )
    return CheckedSequence(residues[:max_residues], len(residues))


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
                    SequenceReason.BAD_MARKUP,
                    f"nested {SEQ_OPEN} at character {match.start()}{_where(record)} "
                    f"(the {SEQ_OPEN} at character {open_at} is not closed)"
                )
            open_at = match.start()
        else:
            if open_at is None:
                raise ProteinSequenceError(
                    SequenceReason.BAD_MARKUP,
                    f"{SEQ_CLOSE} at character {match.start()}{_where(record)} has no {SEQ_OPEN} before it"
                )
            inner_start = open_at + len(SEQ_OPEN)
            spans.append(SeqSpan(open_at, match.end(), text[inner_start : match.start()]))
            open_at = None
    if open_at is not None:
        raise ProteinSequenceError(SequenceReason.BAD_MARKUP, f"{SEQ_OPEN} at character {open_at}{_where(record)} is never closed")
    return spans


def strip_markup(text: str, protein_token: str) -> str:
    """`text` without `<seq>`/`</seq>` tags and placeholder tokens: a model's reply put back into a chat
    history, which the processor parses again, must not read as protein markup."""
    return _TAG.sub("", text).replace(protein_token, "")


def format_sequence(residues: str) -> str:
    """ProteinLMDataset's inline text form: `<seq> M K T ... </seq>`."""
    return f"{SEQ_OPEN} {' '.join(residues)} {SEQ_CLOSE}"
