"""Prompts as the model sees them: token-id prompts with inline proteins equal the processor's own input."""

import pytest
from sample_proteins import P1

from protein_llava.data.prompts import TEMPLATES, user_message
from protein_llava.evaluation.benchmarks import official_prompt
from protein_llava.sequences import ProteinSequenceError
from protein_llava.inference.serving.prompts import (
    PromptError,
    decode_with_offsets,
    prepare_rendered_prompt,
    prepare_text_prompt,
    prepare_token_prompt,
)

RESIDUES = P1.replace(" ", "")


def chat(processor, content: str, reply: str = "") -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True) + reply


def test_prompt_without_proteins_is_kept_token_for_token(tiny):
    _, processor = tiny
    ids = processor.tokenizer("no protein here", add_special_tokens=False)["input_ids"]
    prompt = prepare_token_prompt(processor, ids, "prompt[0]")
    assert prompt.input_ids == ids
    assert prompt.proteins == []
    assert prompt.positions == list(range(len(ids)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, reply",
    [
        (user_message("What is the function?", RESIDUES), ""),
        (user_message(TEMPLATES["function"], "MKTAYIAKQRQISFVKSHFSRQ"), ""),
        (official_prompt("Which motif does <seq> M K T A </seq> carry?", ["a", "b", "c", "d"]), "The correct option is: 3"),
    ],
)
def test_token_prompt_equals_the_processors_input_on_smollm2(smollm2, content, reply):
    """What lm-eval sends (the whole text tokenized by SmolLM2's BPE, proteins as letters) becomes exactly
    the ids eval.py feeds the model, so every log-probability after the proteins is the same."""
    _, _, processor = smollm2
    text = chat(processor, content, reply)
    reference = prepare_rendered_prompt(processor, text, "x")
    client_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = prepare_token_prompt(processor, client_ids, "x")
    assert prompt.input_ids == reference.input_ids
    assert prompt.proteins == reference.proteins
    # Every client token after the last protein span sits at its own id in the model input.
    after = [i for i, position in enumerate(prompt.positions) if position is not None and i > prompt.positions.index(None)]
    assert after, "the prompt has text after the protein"
    assert all(prompt.input_ids[prompt.positions[i]] == client_ids[i] for i in after)
    assert prompt.client_text == text


def test_positions_map_client_tokens_around_a_protein(tiny):
    _, processor = tiny
    text = "before <seq> M K T A Y </seq> after"
    prompt = prepare_text_prompt(processor, text, "prompt[0]")
    client = prompt.client_ids
    inside = [i for i, position in enumerate(prompt.positions) if position is None]
    start, end = text.index("<seq>"), text.index("</seq>") + len("</seq>")
    # The tokens without a position are exactly those that touch the span.
    touching = [i for i, offset in enumerate(prompt.client_offsets) if offset < end and offset + len(processor.tokenizer.decode([client[i]])) > start]
    assert inside == touching
    for index, position in enumerate(prompt.positions):
        if position is not None:
            assert prompt.input_ids[position] == client[index]
    assert prompt.input_ids.count(processor.protein_token_id) == processor.num_protein_tokens(5)
    assert prompt.proteins == ["MKTAY"]


def test_offsets_add_up_to_the_text(tiny):
    _, processor = tiny
    tokenizer = processor.tokenizer
    for text in ["plain ascii", "accents é and 🧬 emoji", ""]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] or tokenizer(" ", add_special_tokens=False)["input_ids"]
        decoded, offsets = decode_with_offsets(tokenizer, ids)
        assert decoded == tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert offsets[0] == 0
        assert offsets == sorted(offsets) and offsets[-1] <= len(decoded)


@pytest.mark.parametrize(
    "ids, reason, detail",
    [
        ([], "empty_prompt", "no tokens"),
        ([1, -1], "token_out_of_range", "token 1 is -1"),
        ([1, 10**9], "token_out_of_range", "token 1 is 1000000000"),
        ([True], "token_out_of_range", "token 0 is True"),
    ],
)
def test_bad_token_prompts_are_refused_with_a_reason(tiny, ids, reason, detail):
    _, processor = tiny
    with pytest.raises(PromptError, match=detail) as caught:
        prepare_token_prompt(processor, ids, "prompt[0]")
    assert caught.value.reason == reason


def test_placeholder_and_bad_markup_are_refused(tiny):
    _, processor = tiny
    # A literal placeholder is bad markup here as in the processor: one code per fault.
    with pytest.raises(PromptError) as caught:
        prepare_token_prompt(processor, [processor.protein_token_id], "prompt[0]")
    assert caught.value.reason == "bad_markup"
    with pytest.raises(PromptError, match="contains '<protein>' literally") as caught:
        prepare_text_prompt(processor, "a <protein> b", "prompt[0]")
    assert caught.value.reason == "bad_markup"
    with pytest.raises(ProteinSequenceError, match="appears literally") as caught:
        processor(text=["a <protein> b"])
    assert str(caught.value.reason) == "bad_markup"
    with pytest.raises(PromptError, match="never closed") as caught:
        prepare_text_prompt(processor, "a <seq> M K", "prompt[0]")
    assert caught.value.reason == "bad_markup"
    with pytest.raises(PromptError, match=r"invalid residue 'J' at position 2 in prompt\[0\]"):
        prepare_text_prompt(processor, "a <seq> M J </seq>", "prompt[0]")
