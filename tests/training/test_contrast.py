"""The swap-contrast loss: swapped batches re-expand placeholders, and the loss is the margin term it claims."""

import pytest
import torch

from protein_llava.data.collate import SWAPPED_PREFIX, PaddedCollator, swap_batch_proteins
from protein_llava.data.records import Conversation, Turn
from protein_llava.constants import IGNORE_INDEX
from protein_llava.data.tokenize import ConversationTokenizer, with_proteins
from protein_llava.training.optim import OptimConfig
from protein_llava.training.stage import STAGE1, StageModule, apply_stage_spec, stage2_spec


def examples(processor, proteins=("MKTAYIAKQR", "GGSW", "KKKKKDDDDDEEEEEEE")):
    tokenizer = ConversationTokenizer(processor, max_length=256)
    records = [
        Conversation((Turn("user", f"What is it? <seq> {' '.join(p)} </seq>"), Turn("assistant", f"It is {i}.")), f"r{i}")
        for i, p in enumerate(proteins)
    ]
    records.append(Conversation((Turn("user", "No protein here."), Turn("assistant", "Fine.")), "text"))
    return [tokenizer(r) for r in records]


def test_with_proteins_resizes_placeholder_runs_and_keeps_everything_else(tiny):
    _, processor = tiny
    example = examples(processor)[0]
    new = "MK" * 20
    count = processor.num_protein_tokens(len(new))
    swapped = with_proteins(example, [new], [count], processor.protein_token_id)
    placeholder = processor.protein_token_id
    assert sum(t == placeholder for t in swapped.input_ids) == count != example.protein_token_counts[0]
    assert [t for t in swapped.input_ids if t != placeholder] == [t for t in example.input_ids if t != placeholder]
    assert [l for l in swapped.labels if l != IGNORE_INDEX] == [l for l in example.labels if l != IGNORE_INDEX]
    assert swapped.proteins == (new,) and swapped.protein_token_counts == (count,)
    with pytest.raises(ValueError, match="1 proteins, given 2 replacements"):
        with_proteins(example, [new, new], [count, count], placeholder)


def test_swapped_batch_gives_every_protein_another_and_leaves_text_rows(tiny):
    _, processor = tiny
    batch = examples(processor)
    swapped = swap_batch_proteins(batch, processor)
    assert [e.proteins for e in swapped] == [("KKKKKDDDDDEEEEEEE",), ("MKTAYIAKQR",), ("GGSW",), ()]
    assert swapped[3].input_ids == batch[3].input_ids
    assert swap_batch_proteins(batch[:1] + batch[3:], processor) is None  # one distinct protein: nothing to swap
    collated = PaddedCollator(0, processor, swapped_copy=True)(batch)
    direct = PaddedCollator(0, processor)(swapped)
    for key, value in direct.items():
        assert torch.equal(collated[SWAPPED_PREFIX + key], value), key


def test_contrastive_loss_is_the_nll_plus_the_margin_violation(tiny):
    model, processor = tiny
    batch = PaddedCollator(0, processor, swapped_copy=True)(examples(processor))
    weight, margin = 0.5, 3.0
    module = StageModule(apply_stage_spec(model, stage2_spec()), OptimConfig(), loss_chunk_size=7,
                         contrast_weight=weight, contrast_margin=margin)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    with torch.no_grad():
        total = module.loss(dict(batch))
        plain = module.loss(dict(batch), contrast=False)
        true = {k: v for k, v in batch.items() if not k.startswith(SWAPPED_PREFIX)}
        swapped = {k.removeprefix(SWAPPED_PREFIX): v for k, v in batch.items() if k.startswith(SWAPPED_PREFIX)}
        per_row = []
        for source in (true, swapped):
            out = model(**{k: v for k, v in source.items() if k != "labels"})
            logits, labels = out.logits[:, :-1], source["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            per_row.append(losses.sum(1))
    gap = per_row[1][:3] - per_row[0][:3]  # the text-only row (index 3) is left out of the contrast
    expected = plain + weight * torch.relu(margin - gap).mean()
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)
    assert total > plain  # a random model's gap is far below a 3-nat margin
    # The mean part is the plain loss: transformers' mean over every supervised token.
    torch.testing.assert_close(plain, model(**true).loss, rtol=1e-4, atol=1e-5)


def test_contrast_needs_a_multimodal_model_and_padded_batches(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="needs a multimodal model"):
        StageModule(model.language_model, OptimConfig(), contrast_weight=1.0)
    from protein_llava.training.datamodule import SFTDataModule

    with pytest.raises(ValueError, match="needs padded batches"):
        SFTDataModule("x.jsonl", None, 0, batching="packed", pack_length=64, swapped_copy=True)
    assert apply_stage_spec(model, STAGE1) is model
