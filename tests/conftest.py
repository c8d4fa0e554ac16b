"""Shared fixtures: tiny random models (seconds on CPU), the real SmolLM2 decoder (loaded once), shared data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from protein_llava import build_tiny
from protein_llava.builders import build_protein_llm, load_smollm2
from protein_llava.model.configuration import ProteinLLMConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def tiny():
    """A fresh random tiny (model, processor); seed 0."""
    return build_tiny(seed=0)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny-model matmuls run faster unsplit than across OpenMP threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny ProteinLLM saved with save_pretrained (model + processor in one folder)."""
    model, processor = build_tiny(seed=0)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """(bare SmolLM2 decoder, ProteinLLM around an independent copy of it, processor). Loaded once per worker (under 1 s from the de-quantised cache)."""
    decoder, tokenizer = load_smollm2()
    decoder.eval()
    torch.manual_seed(0)
    model, processor = build_protein_llm(
        ProteinLLMConfig.from_preset("smollm2-demo"), tokenizer, copy.deepcopy(decoder)
    )
    return decoder, model.eval(), processor


@pytest.fixture(scope="session")
def smollm2_folder(smollm2, tmp_path_factory):
    """The smollm2-demo ProteinLLM saved to a folder."""
    _, model, processor = smollm2
    folder = tmp_path_factory.mktemp("smollm2-demo")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project, or a visible skip when this checkout has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent (it sits beside the project in CI)")
    return SHARED_DATA
