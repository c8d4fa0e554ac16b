"""Batching tokenized examples: right padding, labels masked on padding, ESM tokens for every protein."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..processing import ProteinLLMProcessor
from .tokenize import IGNORE_INDEX, Example


class PaddedCollator:
    """Examples → a padded batch for `ProteinLLM.forward` (or a plain decoder when `processor` is None).

    Keys: `input_ids`, `attention_mask`, `labels` (B, T) and, when any example has a protein,
    `protein_input_ids` (all proteins of the batch in order, as `ProteinLLMProcessor.encode_proteins`).
    """

    def __init__(self, pad_token_id: int, processor: ProteinLLMProcessor | None = None, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
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
            if self.processor is None:
                raise ValueError("examples carry proteins but the collator has no processor to encode them")
            batch["protein_input_ids"] = self.processor.encode_proteins(proteins)
        return batch
