"""Packing: several samples per row, attention kept inside each sample; each sample's loss equals its loss alone."""

import itertools

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from protein_llava import build_tiny
from protein_llava.data.batching import ResumableBatchSampler, first_fit_packs
from protein_llava.data.collate import PackedCollator, PaddedCollator, real_token_fraction
from protein_llava.data.records import Conversation, Turn
from protein_llava.constants import IGNORE_INDEX
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.training.datamodule import ExampleDataset
from sample_proteins import P1, P2


def examples(processor):
    tokenize = ConversationTokenizer(processor, 512)
    conversations = [
        [("user", f"<seq> {P1} </seq> What is it?"), ("assistant", "A kinase.")],
        [("user", "Which residue carries a thiol?"), ("assistant", "Cysteine.")],
        [("user", f"Compare <seq> {P2} </seq> and <seq> M K T </seq>"), ("assistant", "The first is longer.")],
        [("text", "Proteins fold into shapes.")],
    ]
    return [tokenize(Conversation(tuple(Turn(r, c) for r, c in turns), f"rec-{i}")) for i, turns in enumerate(conversations)]


def per_sample_losses(logits, labels):
    """Summed next-token cross-entropy of each row's supervised tokens."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none").sum(1)


def test_first_fit_packs_respect_capacity():
    lengths = [5, 9, 3, 7, 2, 8]
    packs = first_fit_packs(range(6), lengths, capacity=10)
    assert sorted(i for pack in packs for i in pack) == list(range(6))
    assert all(sum(lengths[i] for i in pack) <= 10 for pack in packs)
    assert len(packs) == 4  # 34 tokens need at least 4 rows of 10


def test_each_sample_loss_in_a_packed_row_equals_its_loss_alone():
    model, processor = build_tiny()
    model.eval()
    batch_examples = examples(processor)
    collator = PackedCollator(pad_token_id=3, pack_length=1024, processor=processor)
    packed = collator([batch_examples])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # all four share one row
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
    start = 0
    for example in batch_examples:
        n = len(example.input_ids)
        alone_batch = PaddedCollator(3, processor)([example])
        with torch.no_grad():
            alone = model(**{k: v for k, v in alone_batch.items() if k != "labels"}).logits
        alone_loss = per_sample_losses(alone, alone_batch["labels"])[0]
        packed_loss = per_sample_losses(logits[None, start : start + n], packed["labels"][0, start : start + n][None])[0]
        torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)
        start += n


def test_packed_batch_loss_equals_padded_batch_loss():
    model, processor = build_tiny()
    model.eval()
    batch_examples = examples(processor)
    with torch.no_grad():
        packed = model(**PackedCollator(3, 1024, processor)([batch_examples]), use_cache=False).loss
        padded = model(**PaddedCollator(3, processor)(batch_examples)).loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_packing_fills_rows():
    _, processor = build_tiny()
    batch_examples = examples(processor) * 6
    lengths = [len(e.input_ids) for e in batch_examples]
    packs = first_fit_packs(range(len(batch_examples)), lengths, capacity=512)  # the packed sampler's rows
    collator = PackedCollator(3, 512, processor, pad_to_multiple_of=1)
    batch = collator([[batch_examples[i] for i in pack] for pack in packs])
    real = sum(lengths)
    assert batch["input_ids"].shape[0] == -(-real // 512)  # as few rows as the tokens allow
    assert real_token_fraction(batch, lengths) == real / (batch["input_ids"].shape[0] * batch["input_ids"].shape[1])
    assert (batch["input_ids"] != 3).sum() == real  # every real token kept, padding only at row ends
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(e.num_supervised for e in batch_examples) - sum(
        e.labels[0] != IGNORE_INDEX for e in batch_examples
    )


def test_the_collator_lays_out_the_samplers_rows_as_given():
    _, processor = build_tiny()
    batch_examples = examples(processor)
    lengths = [len(e.input_ids) for e in batch_examples]
    sampler = ResumableBatchSampler(lengths * 3, batch_size=2, seed=0, mode="packed", pack_length=max(lengths) + 8)
    dataset = ExampleDataset(batch_examples * 3)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PackedCollator(3, max(lengths) + 8, processor, pad_to_multiple_of=1))
    for rows, batch in zip(sampler, loader):
        assert batch["input_ids"].shape[0] == len(rows) == 2
        for r, row in enumerate(rows):
            expected = [token for i in row for token in dataset[i].input_ids]
            assert batch["input_ids"][r, : len(expected)].tolist() == expected  # this row, in this order
            starts = [0, *itertools.accumulate(lengths[i % len(lengths)] for i in row)][:-1]
            assert all(batch["position_ids"][r, s].item() == 0 for s in starts)
    with pytest.raises(ValueError, match=r"a row of \d+ tokens \(rec-0, rec-2\) is over pack_length=20"):
        PackedCollator(3, 20, processor)([[batch_examples[0], batch_examples[2]]])
    with pytest.raises(ValueError, match="takes rows"):
        PackedCollator(3, 1024, processor)(batch_examples)
