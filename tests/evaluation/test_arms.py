"""Tests for protein_llava.evaluation.arms: source checks, loading saved folders, what each arm reads."""

from __future__ import annotations

import pytest

from protein_llava.builders import build_tiny
from protein_llava.evaluation.arms import check_model_source, load_arm
from protein_llava.loading import LoadedModel
from protein_llava.sequences import format_sequence


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model, processor = build_tiny(seed=0)
    root = tmp_path_factory.mktemp("arms")
    model.save_pretrained(root / "multimodal")
    processor.save_pretrained(root / "multimodal")
    model.language_model.save_pretrained(root / "text")
    processor.tokenizer.save_pretrained(root / "text")
    return root


def test_check_model_source(tmp_path):
    check_model_source("smollm2", "model")
    check_model_source(None, "baseline")
    with pytest.raises(FileNotFoundError, match=f"baseline folder {tmp_path / 'nope'} does not exist"):
        check_model_source(str(tmp_path / "nope"), "baseline")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_source(str(tmp_path), "model")


def test_load_saved_folders(folders):
    multimodal = load_arm("model", str(folders / "multimodal"), device="cpu")
    text = load_arm("baseline", str(folders / "text"), device="cpu")
    assert multimodal.multimodal and not text.multimodal
    prompt = f"Which? {format_sequence('MKTAY')}"
    encoded = multimodal.encode([prompt, "x"], add_special_tokens=True)
    assert encoded["protein_input_ids"].shape == (1, 7)  # <cls> + 5 residues + <eos>
    assert (encoded["input_ids"] == multimodal.processor.protein_token_id).sum() == 5
    plain = text.encode([prompt, "x"], add_special_tokens=True)
    assert "protein_input_ids" not in plain
    assert plain["attention_mask"][1].tolist()[-1] == 1 and plain["attention_mask"][1].tolist()[0] == 0  # left padded


def test_problems_and_chat():
    model, processor = build_tiny(seed=0)
    multimodal = LoadedModel(model, processor.tokenizer, processor, name="model", source="tiny")
    text = LoadedModel(model.language_model, processor.tokenizer, None, name="baseline", source="tiny")
    too_long = f"Q {format_sequence('A' * 1100)}"
    assert multimodal.problem(too_long) == "too_long_protein" and text.problem(too_long) is None
    assert multimodal.problem("<seq> M K </seq>") is None
    processor.tokenizer.chat_template = None  # this fixture-free model is ours to change
    with pytest.raises(ValueError, match="has no chat template"):
        text.render("hello", "chat")
