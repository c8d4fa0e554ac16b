"""Batching tokenized examples: right padding, labels masked on padding, ESM tokens for every protein."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.processing import ProteinLLMProcessor
from ..constants import IGNORE_INDEX
from .tokenize import Example, with_proteins

SWAPPED_PREFIX = "swapped_"


def protein_inputs(proteins: list[str], processor: ProteinLLMProcessor | None, representation_cache=None) -> dict:
    """What the model reads for a batch's proteins: cached encoder features if a cache is given, else ESM tokens."""
    if representation_cache is not None:
        return representation_cache.batch(proteins)
    if processor is None:
        raise ValueError("examples carry proteins but the collator has no processor to encode them")
    return {"protein_input_ids": processor.encode_proteins(proteins)}


class PaddedCollator:
    """Examples → a padded batch for `ProteinLLM.forward` (or a plain decoder when `processor` is None).

    Keys: `input_ids`, `attention_mask`, `labels` (B, T) and, when any example has a protein,
    `protein_input_ids` (all proteins of the batch in order, as `ProteinLLMProcessor.encode_proteins`) or,
    with a `representation_cache`, their cached encoder features.
    """

    def __init__(self, pad_token_id: int, processor: ProteinLLMProcessor | None = None, pad_to_multiple_of: int = 8,
                 representation_cache=None, swapped_copy: bool = False):
        if swapped_copy and processor is None:
            raise ValueError("swapped_copy needs the processor (it re-expands placeholders for the swapped proteins)")
        self.pad_token_id = pad_token_id
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of
        self.representation_cache = representation_cache
        self.swapped_copy = swapped_copy

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = self._collate(examples)
        if self.swapped_copy:
            swapped = swap_batch_proteins(examples, self.processor)
            if swapped is not None:
                batch.update({SWAPPED_PREFIX + k: v for k, v in self._collate(swapped).items()})
        return batch

    def _collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        longest = max(len(e.input_ids) for e in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        proteins = [p for e in examples for p in e.proteins]
        if proteins:
            batch.update(protein_inputs(proteins, self.processor, self.representation_cache))
        return batch


def swap_batch_proteins(examples: Sequence[Example], processor: ProteinLLMProcessor) -> list[Example] | None:
    """The batch with every protein replaced by the next-longer distinct protein of the same batch (the
    longest by the shortest), for the swap-contrast loss; None when the batch holds fewer than 2 distinct
    proteins (no swap can change anything). Examples without proteins stay as they are."""
    distinct = sorted({p for e in examples for p in e.proteins}, key=lambda p: (len(p), p))
    if len(distinct) < 2:
        return None
    replacement = {protein: distinct[(i + 1) % len(distinct)] for i, protein in enumerate(distinct)}
    swapped = []
    for example in examples:
        proteins = [replacement[p] for p in example.proteins]
        counts = [processor.num_protein_tokens(len(p)) for p in proteins]
        swapped.append(with_proteins(example, proteins, counts, processor.protein_token_id))
    return swapped


class PackedCollator:
    """Rows of examples → a batch whose rows hold several samples each, with no padding between them.

    Which examples share a row is the batch sampler's decision (`ResumableBatchSampler`, mode="packed");
    this lays the given rows out as they are and refuses a row over `pack_length` tokens.
    Position ids restart at 0 for every sample and no attention mask is returned: transformers then keeps
    attention inside each sample (flash-attention varlen on GPU; a block-diagonal mask for sdpa / eager).
    A sample's first label is masked, since the token before it belongs to another sample. A protein's
    placeholder run always stays inside its sample, so it is never split.
    """

    def __init__(self, pad_token_id: int, pack_length: int, processor: ProteinLLMProcessor | None = None, pad_to_multiple_of: int = 8, representation_cache=None):
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of
        self.representation_cache = representation_cache

    def __call__(self, rows: Sequence[Sequence[Example]]) -> dict[str, torch.Tensor]:
        for row in rows:
            if not row or isinstance(row, Example):
                raise ValueError("PackedCollator takes rows (lists) of examples, as the packed batch sampler yields them")
            tokens = sum(len(e.input_ids) for e in row)
            if tokens > self.pack_length:
                ids = ", ".join(e.record_id for e in row)
                raise ValueError(f"a row of {tokens} tokens ({ids}) is over pack_length={self.pack_length}")
        longest = max(sum(len(e.input_ids) for e in row) for row in rows)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        proteins = []
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example.input_ids)
                input_ids[r, start : start + n] = torch.tensor(example.input_ids)
                labels[r, start : start + n] = torch.tensor(example.labels)
                labels[r, start] = IGNORE_INDEX
                position_ids[r, start : start + n] = torch.arange(n)
                proteins.extend(example.proteins)
                start += n
            # The tail padding is one more "sample" of its own, attending to nothing real.
            position_ids[r, start:] = torch.arange(width - start)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if proteins:
            batch.update(protein_inputs(proteins, self.processor, self.representation_cache))
        return batch


def real_token_fraction(batch: dict[str, torch.Tensor], lengths: Sequence[int]) -> float:
    """Share of the batch's token slots that hold real tokens."""
    return sum(lengths) / batch["input_ids"].numel()
