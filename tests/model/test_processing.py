import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protein_llava import ProteinLLMProcessor
from protein_llava.model.configuration import ProjectorConfig
from protein_llava.model.encoder import esm2_alphabet
from protein_llava.sequences import ProteinSequenceError
from protein_llava.text_tokenizer import byte_level_tokenizer


def make_processor(**kwargs) -> ProteinLLMProcessor:
    return ProteinLLMProcessor(byte_level_tokenizer(), projector_config=ProjectorConfig(**kwargs))


def test_pinned_ids_for_a_known_input():
    processor = make_processor()
    assert processor.protein_token_id == 260
    out = processor(text=["Hi <seq> M K </seq>?"], return_tensors="pt")
    # Byte-level tokenizer: byte b has id 4 + b; the two residues became two <protein> placeholders (260).
    assert out["input_ids"].tolist() == [[4 + ord("H"), 4 + ord("i"), 4 + ord(" "), 260, 260, 4 + ord("?")]]
    # fair-esm's alphabet: <cls>=0, M=20, K=15, <eos>=2.
    assert out["protein_input_ids"].tolist() == [[0, 20, 15, 2]]


def test_esm_tokens_equal_fair_esm_batch_converter():
    processor = make_processor()
    sequences = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSIPSSQYG", "XBUZO"]
    _, _, reference = esm2_alphabet().get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    assert torch.equal(processor.encode_proteins(sequences), reference)


def test_placeholder_counts_follow_the_projector():
    processor = make_processor(token_reduction="mean_pool", pool_stride=4)
    out = processor(text=["<seq> M K T A Y I A K Q R </seq> and <seq> M K </seq>"])
    assert (out["input_ids"] == processor.protein_token_id).sum().item() == 3 + 1
    assert out["protein_input_ids"].shape == (2, 12)


def test_batch_with_and_without_proteins_left_padded():
    processor = make_processor()
    out = processor(text=["Which residue carries a thiol?", "<seq> M K T </seq> function?"])
    assert out["protein_input_ids"].shape == (1, 5)
    assert out["attention_mask"][0, 0].item() == 0 or out["attention_mask"][1, 0].item() == 0  # left padding
    assert out["attention_mask"][:, -1].tolist() == [1, 1]


def test_explicit_proteins_list_matches_inline_form():
    processor = make_processor()
    inline = processor(text=["A <seq> M K T </seq> B <seq> M S </seq>"])
    explicit = processor(text=["A <protein> B <protein>"], proteins=[["mkt", "M S"]])
    assert torch.equal(inline["input_ids"], explicit["input_ids"])
    assert torch.equal(inline["protein_input_ids"], explicit["protein_input_ids"])


@pytest.mark.parametrize(
    ("kwargs", "reason", "message"),
    [
        ({"text": ["<seq> M K J T </seq>"]}, "invalid_residue", "invalid residue 'J' at position 3 in sample 0, protein 1"),
        ({"text": ["A <protein> B"], "proteins": [[]]}, "bad_markup", "1 <protein> markers but 0 proteins"),
        ({"text": ["<seq> M </seq> <protein>"], "proteins": [["MK"]]}, "bad_markup", "mixes inline <seq> spans"),
        ({"text": ["a literal <protein> here"]}, "bad_markup", "appears literally"),
        ({"text": ["<seq> M K"]}, "bad_markup", "never closed"),
        ({"text": ["<seq> </seq>"]}, "empty_sequence", "empty protein sequence in sample 0, protein 1"),
    ],
)
def test_bad_input_gets_a_typed_error(kwargs, reason, message):
    with pytest.raises(ProteinSequenceError, match=message) as error:
        make_processor()(**kwargs)
    assert error.value.reason == reason


def test_overlong_protein_policy():
    strict = ProteinLLMProcessor(byte_level_tokenizer(), max_residues=5)
    with pytest.raises(ProteinSequenceError, match="7 residues in sample 0, protein 1 is longer than the encoder's limit of 5") as error:
        strict(text=["<seq> MKTAYIA </seq>"])
    assert error.value.reason == "too_long_protein"
    lenient = ProteinLLMProcessor(byte_level_tokenizer(), max_residues=5, overflow="truncate")
    with pytest.warns(UserWarning, match="truncated from 7 to 5 residues"):
        out = lenient(text=["<seq> MKTAYIA </seq>"])
    assert (out["input_ids"] == lenient.protein_token_id).sum().item() == 5


def test_chat_template_with_proteins():
    processor = make_processor()
    messages = [{"role": "user", "content": [{"type": "protein", "sequence": "MKT"}, {"type": "text", "text": " What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<seq> M K T </seq> What is it?<|im_end|>\n<|im_start|>assistant\n"
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert (batch["input_ids"] == processor.protein_token_id).sum().item() == 3
    assert batch["protein_input_ids"].tolist() == [[0, 20, 15, 11, 2]]


def test_save_and_load_round_trip(tmp_path):
    processor = make_processor(token_reduction="mean_pool", pool_stride=2)
    processor.save_pretrained(tmp_path)
    again = ProteinLLMProcessor.from_pretrained(tmp_path)
    assert again.protein_token_id == processor.protein_token_id
    assert again.num_protein_tokens(9) == 5
    text = ["<seq> M K T A Y </seq> What?", "plain"]
    for key, value in processor(text=text).items():
        assert torch.equal(value, again(text=text)[key]), key


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_arbitrary_text_gives_a_batch_or_a_typed_error(text):
    processor = make_processor()
    try:
        out = processor(text=[text])
    except ProteinSequenceError:
        return
    assert out["input_ids"].shape[0] == 1
