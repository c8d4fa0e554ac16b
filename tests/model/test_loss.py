import pytest
import torch

from protein_llava import build_tiny
from protein_llava.data.collate import PaddedCollator
from protein_llava.data.records import Conversation, Turn
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.model.loss import chunked_causal_lm_forward, chunked_cross_entropy
from sample_proteins import P1


def batch_for(processor):
    tokenize = ConversationTokenizer(processor, 512)
    rows = [
        Conversation((Turn("user", f"<seq> {P1} </seq> What?"), Turn("assistant", "A kinase that binds ATP.")), "a"),
        Conversation((Turn("user", "Thiol?"), Turn("assistant", "Cysteine.")), "b"),
    ]
    return PaddedCollator(3, processor)([tokenize(c) for c in rows])


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_forward(chunk_size):
    model, processor = build_tiny()
    model.train()
    batch = batch_for(processor)
    plain = model(**batch, use_cache=False).loss
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    output = model(**batch, use_cache=False, loss_chunk_size=chunk_size)
    assert output.logits is None  # the point: no full-vocabulary logits kept
    output.loss.backward()
    torch.testing.assert_close(output.loss, plain, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in plain_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_loss_on_a_lora_wrapped_decoder_inside_and_outside_the_model():
    from peft import LoraConfig, get_peft_model

    model, processor = build_tiny()
    model.language_model = get_peft_model(model.language_model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    batch = batch_for(processor)
    torch.testing.assert_close(model(**batch, loss_chunk_size=5).loss, model(**batch).loss)
    # The text-only arm: the bare (peft-wrapped) decoder, proteins left out of the batch.
    decoder = model.language_model
    text_only = {k: v for k, v in batch.items() if k != "protein_input_ids"}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(text_only["input_ids"] == processor.protein_token_id, 5)
    labels = text_only.pop("labels")
    torch.testing.assert_close(
        chunked_causal_lm_forward(decoder, labels, 5, **text_only).loss, decoder(**text_only, labels=labels).loss
    )


def test_no_supervised_tokens_gives_zero_with_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, torch.nn.Linear(8, 10), torch.full((1, 4), -100), chunk_size=2)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="loss_chunk_size must be >= 1, got 0"):
        chunked_cross_entropy(hidden, torch.nn.Linear(8, 10), torch.full((1, 4), -100), chunk_size=0)


def test_per_sample_sums_add_up_to_the_batch_mean_and_match_rows_alone():
    from protein_llava.model.loss import chunked_cross_entropy_per_sample

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, :] = -100  # a row with nothing supervised
    sums, counts = chunked_cross_entropy_per_sample(hidden, head, labels, chunk_size=4)
    assert counts.tolist() == [3, 5, 0] and sums[2] == 0
    logits = head(hidden)
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sums.sum() / counts.sum(), full)
    for row in range(2):
        alone = torch.nn.functional.cross_entropy(logits[row, :-1], labels[row, 1:], ignore_index=-100, reduction="sum")
        torch.testing.assert_close(sums[row], alone)
