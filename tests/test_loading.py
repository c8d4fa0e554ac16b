"""protein_llava.loading: the one loader and `LoadedModel`, held by predict, chat, serve, the web demo and eval; dtype names; the "auto" device."""

from __future__ import annotations

import pytest
import torch

from protein_llava.builders import build_tiny
from protein_llava.loading import (
    DTYPES,
    ensure_pad_token,
    is_protein_llm_folder,
    load_model,
    resolve_device,
    saved_model_type,
    load_protein_llm,
    torch_dtype,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """The tiny model's bare decoder, saved with a tokenizer that has no pad token."""
    model, processor = build_tiny(seed=0)
    folder = tmp_path_factory.mktemp("text-only")
    model.language_model.save_pretrained(folder)
    processor.tokenizer.pad_token = None
    processor.tokenizer.save_pretrained(folder)
    return folder


def test_dtype_names_and_devices():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype(None) is None
    assert torch_dtype(torch.float16) is torch.float16
    assert sorted(DTYPES) == ["bfloat16", "float16", "float32"]
    with pytest.raises(ValueError, match=r"model.dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'float8'"):
        torch_dtype("float8", "model.dtype")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_protein_llm_folder_loads_with_its_processor_in_the_dtype_asked(tiny_folder):
    built, _ = build_tiny(seed=0)  # what tiny_folder holds
    assert saved_model_type(tiny_folder) == "protein_llava" and is_protein_llm_folder(tiny_folder)
    loaded = load_model(tiny_folder, "bfloat16", "cpu")
    assert loaded.multimodal and loaded.tokenizer is loaded.processor.tokenizer
    assert not loaded.model.training and loaded.device == torch.device("cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    as_saved = load_model(tiny_folder, device="cpu")
    for (name, saved), (_, again) in zip(built.state_dict().items(), as_saved.model.state_dict().items()):
        torch.testing.assert_close(again, saved, rtol=0, atol=0, msg=name)


def test_a_text_folder_loads_text_only_with_a_pad_token(text_folder):
    assert not is_protein_llm_folder(text_folder) and not is_protein_llm_folder("smollm2")
    loaded = load_model(text_folder, device="cpu")
    assert not loaded.multimodal and loaded.processor is None
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token is not None


def test_load_protein_llm_refuses_a_text_folder(text_folder, tmp_path):
    with pytest.raises(ValueError, match="holds a 'llama' model, not a ProteinLLM"):
        load_protein_llm(text_folder, device="cpu")
    with pytest.raises(FileNotFoundError, match="is not a saved model folder"):
        load_protein_llm(tmp_path, device="cpu")


def test_ensure_pad_token_keeps_an_existing_one():
    _, processor = build_tiny(seed=0)
    tokenizer = processor.tokenizer
    before = tokenizer.pad_token
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == before != tokenizer.eos_token


def test_one_generation_path_for_both_kinds_of_model(tiny_folder, text_folder):
    """`LoadedModel` is what predict, chat, serve, the web demo and eval all hold: its stops, `generate`
    settings and reply text are the ones every caller uses, for a ProteinLLM and a text-only model alike."""
    multimodal, text = load_model(tiny_folder, device="cpu"), load_model(text_folder, device="cpu")
    assert multimodal.generation_options()["suppress_tokens"] == [multimodal.processor.protein_token_id]
    assert "suppress_tokens" not in text.generation_options()  # no placeholder to guard
    stop = multimodal.stop_token_ids[0]
    assert multimodal.reply_tokens([5, 6, stop, 7, stop]) == ([5, 6], True)
    assert multimodal.reply_tokens([5, 6]) == ([5, 6], False)
    assert multimodal.reply_text([5, 6, stop, 7]) == multimodal.tokenizer.decode([5, 6], skip_special_tokens=True)
    # The text-only model answers through the same path; its answer equals a plain greedy generate cut there.
    prompt = "a b c"
    answer = text.answer([prompt], max_new_tokens=5)[0]
    ids = text.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    plain = text.model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=text.pad_token_id, eos_token_id=text.stop_token_ids)
    assert answer == text.reply_text(plain[0, ids["input_ids"].shape[1] :].tolist()).strip()
    with pytest.raises(ValueError, match="text-only model: it takes no protein"):
        text.max_residues
