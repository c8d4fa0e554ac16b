import pytest
import torch

from protein_llava import ProteinLLMProcessor
from protein_llava.model.configuration import ProjectorConfig
from protein_llava.data.collate import PaddedCollator
from protein_llava.data.records import Conversation, RecordError, Turn
from protein_llava.constants import IGNORE_INDEX
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.text_tokenizer import byte_level_tokenizer


def processor(**kwargs):
    return ProteinLLMProcessor(byte_level_tokenizer(), projector_config=ProjectorConfig(**kwargs))


def conversation(*turns):
    return Conversation(tuple(Turn(role, content) for role, content in turns), "rec-1")


def supervised_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_pinned_labels_for_a_known_conversation():
    proc = processor()
    example = ConversationTokenizer(proc, 256)(conversation(("user", "<seq> M K </seq>?"), ("assistant", "Hi")))
    im_start, im_end, newline = 1, 2, 4 + ord("\n")
    prompt = [im_start, *[4 + b for b in b"user\n"], 260, 260, 4 + ord("?"), im_end, newline, im_start, *[4 + b for b in b"assistant\n"]]
    reply = [4 + ord("H"), 4 + ord("i"), im_end, newline]
    assert list(example.input_ids) == prompt + reply
    assert list(example.labels) == [IGNORE_INDEX] * len(prompt) + reply
    assert example.proteins == ("MK",) and example.protein_token_counts == (2,)


def test_multi_turn_supervises_every_reply_exactly():
    proc = processor()
    turns = conversation(
        ("system", "Be brief."),
        ("user", "<seq> M K T </seq> What is it?"),
        ("assistant", "A kinase."),
        ("user", "Where?"),
        ("assistant", "In the nucleus."),
    )
    example = ConversationTokenizer(proc, 512)(turns)
    assert supervised_text(proc.tokenizer, example) == "A kinase.<|im_end|>\nIn the nucleus.<|im_end|>\n"


def test_caption_mode_keeps_only_the_protein_and_the_description():
    proc = processor()
    turns = conversation(("user", "Describe: <seq> M K T </seq> please"), ("assistant", "A kinase."))
    example = ConversationTokenizer(proc, 512, mode="caption")(turns)
    assert proc.tokenizer.decode(example.input_ids).startswith("<|im_start|>user\n<protein><protein><protein><|im_end|>")
    assert supervised_text(proc.tokenizer, example) == "A kinase.<|im_end|>\n"
    with pytest.raises(RecordError, match="rec-1: caption training needs a <seq> span"):
        ConversationTokenizer(proc, 512, mode="caption")(conversation(("user", "no protein"), ("assistant", "x")))


def test_text_only_arm_keeps_sequences_inline():
    tokenizer = byte_level_tokenizer()
    example = ConversationTokenizer(None, 512, tokenizer=tokenizer)(conversation(("user", "<seq> M K </seq>"), ("assistant", "ok")))
    assert "<seq> M K </seq>" in tokenizer.decode(example.input_ids) and example.proteins == ()


def test_a_template_that_rewrites_the_reply_is_an_error_not_a_masked_sample():
    proc = processor()
    proc.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(RecordError, match="rec-1: the chat template does not render turn 1's reply verbatim") as error:
        ConversationTokenizer(proc, 512)(conversation(("user", "hi"), ("assistant", "a kinase")))
    assert error.value.reason == "template_mismatch"


def test_truncation_never_splits_a_protein_run():
    proc = processor()
    turns = conversation(("user", "<seq> M K T A Y </seq> and"), ("assistant", "first"), ("user", "<seq> M K T A Y I A K </seq>"), ("assistant", "second"))
    full = ConversationTokenizer(proc, 512)(turns)
    second_run_start = [i for i, t in enumerate(full.input_ids) if t == 260][5]
    limit = second_run_start + 3  # would cut the second protein's run after 3 of its 8 placeholders
    example = ConversationTokenizer(proc, limit)(turns)
    assert example.truncated and len(example.input_ids) == second_run_start
    assert example.proteins == ("MKTAY",) and sum(t == 260 for t in example.input_ids) == 5


def test_a_prompt_that_fills_max_length_is_skipped():
    proc = processor()
    with pytest.raises(RecordError, match="prompt alone fills max_length=16") as error:
        ConversationTokenizer(proc, 16)(conversation(("user", "<seq> " + "M " * 30 + "</seq>"), ("assistant", "x")))
    assert error.value.reason == "prompt_too_long"


def test_collator_pads_right_and_masks_padding():
    proc = processor()
    tokenize = ConversationTokenizer(proc, 512)
    a = tokenize(conversation(("user", "<seq> M K </seq>"), ("assistant", "A")))
    b = tokenize(conversation(("user", "hello there"), ("assistant", "Longer answer")))
    batch = PaddedCollator(pad_token_id=3, processor=proc, pad_to_multiple_of=8)([a, b])
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"][0, len(a.input_ids) :].eq(3).all()
    assert batch["labels"][0, len(a.input_ids) :].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    assert torch.equal(batch["protein_input_ids"], proc.encode_proteins(["MK"]))
