"""In training batches every record's placeholder rows hold its own proteins' features, never a neighbour's.

Records with distinct marker proteins (one to three per record, some of equal length so a mix-up keeps every
count right) go through the real data path: JSONL → `SFTDataModule` (ConversationTokenizer, batch sampler,
collator, optionally the frozen-encoder cache as `run.attach_representation_cache` wires it) → the batches
its train dataloader yields. Each batch goes through `ProteinLLM.embed_inputs`; the rows at each record's
placeholders must equal a direct projector call on that record's own protein alone.

A collated row is mapped back to its record by the record's number written in its text ("Record 07"), read
from the row's own tokens: padded rows are one record each, packed rows are cut where `position_ids` restart.
That identification is independent of the sampler; the sampler's order is then checked to agree with it.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from protein_llava import build_tiny
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.training.config import EncoderCacheSettings, TrainConfig
from protein_llava.training.datamodule import SFTDataModule
from protein_llava.training.run import attach_representation_cache

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# Proteins per record (0: a text-only record, which sits between protein records in a batch).
PROTEINS_PER_RECORD = [1, 2, 0, 3, 1, 2, 1, 0, 2, 1, 3, 1, 2, 1]
# Few distinct lengths, so most batches hold distinct proteins of equal length (a swap would keep the counts).
LENGTHS = (9, 12, 15)
TAG = re.compile(r"Record (\d\d)")
# The tiny model's protein features are about 0.04 at most, and distinct proteins of equal length differ by
# >= 0.038 somewhere (asserted below, against 100 x the tolerance). Measured deviations of the spliced rows:
# online and fp32 cache ~1.5e-8 (the batch and the protein alone differ only in float32 summation order in
# the encoder); fp16 cache ~1e-5 (ESM features up to ~3.2 rounded to fp16, relative 2**-11, then scaled down
# by the projector's std-0.02 weights).
FP32_TOLERANCE = {"atol": 1e-6, "rtol": 0.0}
FP16_TOLERANCE = {"atol": 1e-4, "rtol": 0.0}


def marker_records() -> list[dict]:
    """Flat SFT records; record k says "Record kk" in its instruction and its reply (caption mode keeps the reply)."""
    rng = random.Random(20)
    seen: set[str] = set()
    records = []
    for number, count in enumerate(PROTEINS_PER_RECORD):
        proteins = []
        while len(proteins) < count:
            residues = "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.choice(LENGTHS)))
            if residues not in seen:
                seen.add(residues)
                proteins.append(residues)
        spans = [f"<seq> {' '.join(p)} </seq>" for p in proteins]
        # Record 3 puts two spans side by side: one placeholder run that holds two proteins.
        joiner = "" if number == 3 else " and "
        records.append(
            {
                "instruction": f"Record {number:02d}. What are these?",
                "input": joiner.join(spans),
                "output": f"Record {number:02d}: {len(proteins)} proteins.",
                "proteins": proteins,
            }
        )
    return records


@pytest.fixture(scope="module")
def tiny_stage1():
    """A tiny model as stage 1 trains it (frozen encoder, which the cache needs), its processor and the records."""
    model, processor = build_tiny(seed=0)
    model.set_trainable(encoder=False, projector=True, llm=False)
    model.train()  # as the training step runs; nothing between a batch and its spliced rows is random
    return model, processor, marker_records()


def direct_features(model, processor, residues: str) -> torch.Tensor:
    """(tokens, hidden): the projector on this one protein alone, from its own ESM tokens."""
    with torch.no_grad():
        return model.get_protein_features(protein_input_ids=processor.encode_proteins([residues]))


def training_batches(tmp_path, model, processor, records, batching: str, cache_dtype: str | None, mode: str):
    """(datamodule, the train dataloader's batches, the sampler's batches), wired as `run.train` wires them."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "proteins"}) + "\n" for r in records))
    datamodule = SFTDataModule(
        str(path),
        ConversationTokenizer(processor, 1024, mode=mode),
        pad_token_id=processor.tokenizer.pad_token_id,
        processor=processor,
        batch_size=2 if batching == "packed" else 3,
        seed=0,
        batching=batching,
        pack_length=256 if batching == "packed" else None,
    )
    if cache_dtype is not None:
        settings = EncoderCacheSettings(enabled=True, dir=str(tmp_path / "cache"), dtype=cache_dtype)
        attach_representation_cache(TrainConfig(encoder_cache=settings), model, datamodule)
    else:
        datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    return datamodule, batches, list(datamodule.sampler)


def record_segments(batch: dict, pad_token_id: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample in the batch: padded rows by their attention mask, packed rows where
    position ids restart at 0 (the tail padding, one more restart, is left out)."""
    segments = []
    for row, ids in enumerate(batch["input_ids"]):
        if "position_ids" not in batch:
            segments.append((row, 0, int(batch["attention_mask"][row].sum())))
            continue
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [len(ids)]
        for start, end in zip(starts, starts[1:]):
            if not (ids[start:end] == pad_token_id).all():
                segments.append((row, start, end))
    return segments


def splice_errors(model, processor, records, batch: dict, expected: dict, tolerance: dict):
    """Mismatches between each record's spliced placeholder rows and its own proteins' direct features.

    Returns (errors, the record numbers of the batch's samples in order, (record number, protein index) of
    the batch's proteins in order).
    """
    with torch.no_grad():
        embeds = model.embed_inputs(
            batch["input_ids"],
            batch.get("protein_input_ids"),
            batch.get("protein_representations"),
            batch.get("protein_representations_mask"),
        )  # (B, T, hidden)
    placeholder = batch["input_ids"] == processor.protein_token_id
    text_rows = model.get_input_embeddings()(batch["input_ids"].masked_fill(placeholder, 0))
    errors, found, placements = [], [], []
    if not torch.equal(embeds[~placeholder], text_rows[~placeholder]):
        errors.append("a text position does not hold its token's embedding")
    for row, start, end in record_segments(batch, processor.tokenizer.pad_token_id):
        tags = set(TAG.findall(processor.tokenizer.decode(batch["input_ids"][row, start:end].tolist())))
        if len(tags) != 1:
            errors.append(f"row {row} [{start}:{end}] names records {sorted(tags)}, not exactly one")
            continue
        number = int(tags.pop())
        found.append(number)
        proteins = records[number]["proteins"]
        positions = start + placeholder[row, start:end].nonzero().flatten()
        counts = [processor.num_protein_tokens(len(p)) for p in proteins]
        if len(positions) != sum(counts):
            errors.append(f"record {number}: {len(positions)} placeholders for proteins of {counts} tokens")
            continue
        for index, (residues, rows) in enumerate(zip(proteins, positions.split(counts))):
            placements.append((number, index))
            got = embeds[row, rows]
            want = expected[residues]
            if not torch.allclose(got, want, **tolerance):
                errors.append(
                    f"record {number} protein {index}: spliced rows differ from its own features by "
                    f"{(got - want).abs().max().item():.3g}"
                )
    return errors, found, placements


@pytest.mark.parametrize("mode", ["sft", "caption"])
@pytest.mark.parametrize("cache_dtype", [None, "float32", "float16"], ids=["online", "cache-fp32", "cache-fp16"])
@pytest.mark.parametrize("batching", ["random", "packed"])
def test_each_record_splices_its_own_proteins(tiny_stage1, tmp_path, one_thread, batching, cache_dtype, mode):
    model, processor, records = tiny_stage1
    tolerance = FP16_TOLERANCE if cache_dtype == "float16" else FP32_TOLERANCE
    expected = {p: direct_features(model, processor, p) for r in records for p in r["proteins"]}
    datamodule, batches, sampler_batches = training_batches(
        tmp_path, model, processor, records, batching, cache_dtype, mode
    )
    assert ("protein_representations" in batches[0]) == (cache_dtype is not None)
    if cache_dtype is not None:
        assert batches[0]["protein_representations"].dtype == getattr(torch, cache_dtype)

    # The comparison can fail: distinct proteins of equal length have clearly different features.
    same_length = [(a, b) for a in expected for b in expected if a < b and len(a) == len(b)]
    assert len(same_length) >= 10
    for a, b in same_length:
        assert (expected[a] - expected[b]).abs().max() > 100 * tolerance["atol"]

    examples = datamodule.train_dataset.examples
    number_of = [int(TAG.search(processor.tokenizer.decode(list(e.input_ids))).group(1)) for e in examples]
    checked = []
    for batch, scheduled in zip(batches, sampler_batches, strict=True):
        errors, found, placements = splice_errors(model, processor, records, batch, expected, tolerance)
        assert errors == []
        # The records read from the rows are the ones the sampler scheduled, in its order.
        rows = scheduled if batching == "packed" else [[i] for i in scheduled]
        assert found == [number_of[i] for row in rows for i in row]
        checked.append((rows, placements))

    # What the check covered: batches above 1, packed rows of 3+ records, and records of several proteins
    # whose second protein has another record's protein before it in the batch (an offset a mix-up would shift).
    assert len(checked) >= 2 and all(len(rows) >= 2 for rows, _ in checked)
    if batching == "packed":
        assert max(len(row) for rows, _ in checked for row in rows) >= 3
    later_multi = [n for _, placements in checked for k, (n, i) in enumerate(placements) if i == 1 and k > 1]
    assert len(later_multi) >= 2


@pytest.mark.parametrize("cache_dtype", [None, "float32"], ids=["online", "cache-fp32"])
@pytest.mark.parametrize("batching", ["random", "packed"])
def test_the_check_catches_two_swapped_proteins(tiny_stage1, tmp_path, one_thread, batching, cache_dtype):
    """Negative control: swap two equal-length proteins of different records in a real batch; the check names both."""
    model, processor, records = tiny_stage1
    expected = {p: direct_features(model, processor, p) for r in records for p in r["proteins"]}
    _, batches, _ = training_batches(tmp_path, model, processor, records, batching, cache_dtype, "sft")
    for batch in batches:
        errors, _, placements = splice_errors(model, processor, records, batch, expected, FP32_TOLERANCE)
        assert errors == []
        proteins = [records[n]["proteins"][i] for n, i in placements]
        pairs = [
            (a, b) for a in range(len(proteins)) for b in range(a + 1, len(proteins))
            if len(proteins[a]) == len(proteins[b]) and placements[a][0] != placements[b][0]
        ]
        if pairs:
            break
    else:
        pytest.fail("no batch holds two equal-length proteins of different records")
    a, b = pairs[0]
    swapped = dict(batch)
    key = "protein_input_ids" if cache_dtype is None else "protein_representations"
    swapped[key] = batch[key].clone()
    swapped[key][[a, b]] = batch[key][[b, a]]
    errors, _, _ = splice_errors(model, processor, records, swapped, expected, FP32_TOLERANCE)
    assert len(errors) == 2
    assert f"record {placements[a][0]} protein {placements[a][1]}:" in errors[0] + errors[1]
    assert f"record {placements[b][0]} protein {placements[b][1]}:" in errors[0] + errors[1]
