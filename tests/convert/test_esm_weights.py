"""Tests for protein_llava.convert.esm_weights: HF folders, fair-esm files and pretrained names all load into ESM2."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from pathlib import Path

import esm
import pytest
import torch
from transformers import EsmConfig, EsmForMaskedLM, EsmForSequenceClassification, EsmForTokenClassification, EsmModel

from protein_llava.builders import build_tiny, load_encoder_weights
from protein_llava.convert.esm_weights import (
    FAIR_ESM2_PRETRAINED,
    ESM2Architecture,
    build_esm2,
    download_fair_esm,
    hf_esm_state_dict_to_fair_esm,
    load_esm2_weights,
    load_fair_esm_checkpoint,
    load_state_dict_into_esm2,
)

TINY = ESM2Architecture(num_layers=2, embed_dim=32, attention_heads=4, token_dropout=True)
ATOL = 1e-5


def tiny_hf_config(**overrides) -> EsmConfig:
    """An ESM-2-shaped HF config, as small as the tiny fair-esm architecture."""
    values = dict(
        vocab_size=33,
        hidden_size=TINY.embed_dim,
        num_hidden_layers=TINY.num_layers,
        num_attention_heads=TINY.attention_heads,
        intermediate_size=4 * TINY.embed_dim,
        position_embedding_type="rotary",
        token_dropout=True,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        mask_token_id=32,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return EsmConfig(**values)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter, so layer norms and biases are not at their 1/0 init and a swap shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def hf_model() -> EsmForMaskedLM:
    torch.manual_seed(0)
    return randomize_(EsmForMaskedLM(tiny_hf_config()), seed=1)


@pytest.fixture(scope="module")
def fair_model() -> torch.nn.Module:
    torch.manual_seed(2)
    return randomize_(build_esm2(TINY), seed=3)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """Two sequences of different length (so one is padded), the longer with a <mask> in it."""
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    _, _, batch = alphabet.get_batch_converter()([("long", "MKTAYIAKQRQISFVKSHFSRQ"), ("short", "GSHMLEDP")])
    batch[0, 5] = alphabet.mask_idx
    assert (batch == alphabet.padding_idx).any() and (batch == alphabet.mask_idx).any()
    return batch


def residues(tokens: torch.Tensor) -> torch.Tensor:
    """Mask of the non-pad positions."""
    return tokens != esm.data.Alphabet.from_architecture("ESM-1b").padding_idx


def fair_outputs(model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    with torch.no_grad():
        return model(tokens, repr_layers=list(range(model.num_layers + 1)))


def assert_matches_hf(hf_model: EsmForMaskedLM, fair: torch.nn.Module, tokens: torch.Tensor) -> None:
    """Per-residue representations (an intermediate and the last layer) and logits agree on non-pad positions."""
    keep = residues(tokens)
    attention_mask = keep.long()  # HF's token dropout counts residues from the attention mask
    with torch.no_grad():
        hf_lm = hf_model(tokens, attention_mask=attention_mask, output_hidden_states=True)
        hf_last = hf_model.esm(tokens, attention_mask=attention_mask).last_hidden_state
    out = fair_outputs(fair, tokens)
    representations = out["representations"]
    torch.testing.assert_close(representations[1][keep], hf_lm.hidden_states[1][keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(representations[TINY.num_layers][keep], hf_last[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["logits"][keep], hf_lm.logits[keep], atol=ATOL, rtol=0)


def test_hf_folder_matches_transformers(hf_model, tokens, tmp_path):
    hf_model.save_pretrained(tmp_path)

    arch, state_dict = load_esm2_weights(tmp_path)
    assert arch == TINY
    fair = build_esm2(arch).eval()
    load_state_dict_into_esm2(fair, state_dict)

    assert_matches_hf(hf_model, fair, tokens)


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_model_bin", "sharded_bin"])
def test_hf_folder_weight_layouts(hf_model, tokens, tmp_path, layout):
    hf_model.config.save_pretrained(tmp_path)
    state_dict = {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}
    names = sorted(state_dict)
    halves = {"part-1": names[: len(names) // 2], "part-2": names[len(names) // 2 :]}
    if layout == "sharded_safetensors":
        from safetensors.torch import save_file

        for shard, shard_names in halves.items():
            save_file({n: state_dict[n] for n in shard_names}, tmp_path / shard)
        weight_map = {n: shard for shard, shard_names in halves.items() for n in shard_names}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout == "pytorch_model_bin":
        torch.save(state_dict, tmp_path / "pytorch_model.bin")
    else:
        for shard, shard_names in halves.items():
            torch.save({n: state_dict[n] for n in shard_names}, tmp_path / shard)
        weight_map = {n: shard for shard, shard_names in halves.items() for n in shard_names}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    arch, converted = load_esm2_weights(tmp_path)
    fair = build_esm2(arch).eval()
    load_state_dict_into_esm2(fair, converted)
    assert_matches_hf(hf_model, fair, tokens)


def test_hub_layout_with_legacy_keys(hf_model, tokens):
    """The facebook/esm2_* hub files: per-layer inv_freq, a pooler, position_ids and an unused position table."""
    state_dict = dict(hf_model.state_dict())
    inv_freq = state_dict.pop("esm.rotary_embeddings.inv_freq")
    for index in range(TINY.num_layers):
        state_dict[f"esm.encoder.layer.{index}.attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
    state_dict["esm.embeddings.position_ids"] = torch.arange(1026)[None]
    state_dict["esm.embeddings.position_embeddings.weight"] = torch.zeros(1026, TINY.embed_dim)
    state_dict["esm.pooler.dense.weight"] = torch.zeros(TINY.embed_dim, TINY.embed_dim)
    state_dict["esm.pooler.dense.bias"] = torch.zeros(TINY.embed_dim)

    arch, converted = hf_esm_state_dict_to_fair_esm(state_dict, json.loads(hf_model.config.to_json_string()))
    fair = build_esm2(arch).eval()
    load_state_dict_into_esm2(fair, converted)
    assert_matches_hf(hf_model, fair, tokens)


def test_hf_esm_model_keys_without_prefix(hf_model):
    """A bare EsmModel state dict (no "esm.", no LM head) maps onto all of ESM2 but the LM head's own weights."""
    _, converted = hf_esm_state_dict_to_fair_esm(hf_model.esm.state_dict(), hf_model.config)
    head_only = {"lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias"}
    head_only |= {"lm_head.layer_norm.weight", "lm_head.layer_norm.bias"}
    assert set(converted) == set(build_esm2(TINY).state_dict()) - head_only
    # lm_head.weight is there only as the tied word embeddings; the rest of the head is missing, and a
    # strict load says so rather than leaving a random LM head behind.
    assert converted["lm_head.weight"] is converted["embed_tokens.weight"]
    with pytest.raises(ValueError, match="lm_head.dense.weight"):
        load_state_dict_into_esm2(build_esm2(TINY), converted)


def write_fair_esm_checkpoint(
    path: Path, model: torch.nn.Module, arch: ESM2Architecture, with_regression: bool, cfg_as_dict: bool = False
) -> None:
    """Save `model` the way fair-esm's ESM-2 .pt files are laid out (fairseq prefixes, Namespace cfg)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("contact_head.regression.") and not with_regression:
            continue
        prefix = "encoder." if name.startswith("lm_head.") else "encoder.sentence_encoder."
        state[prefix + name] = tensor.clone()
    cfg = dict(
        _name="esm2",
        encoder_layers=arch.num_layers,
        encoder_embed_dim=arch.embed_dim,
        encoder_ffn_embed_dim=4 * arch.embed_dim,
        encoder_attention_heads=arch.attention_heads,
        token_dropout=arch.token_dropout,
        dropout=0.0,
    )
    model_cfg = cfg if cfg_as_dict else argparse.Namespace(**cfg)
    torch.save({"model": state, "cfg": {"model": model_cfg}, "args": None, "extra_state": {"epoch": 1}}, path)


@pytest.mark.parametrize("with_regression", [True, False], ids=["with_regression", "without_regression"])
@pytest.mark.parametrize("cfg_as_dict", [False, True], ids=["namespace_cfg", "dict_cfg"])
def test_fair_esm_checkpoint_round_trip(fair_model, tokens, tmp_path, with_regression, cfg_as_dict):
    path = tmp_path / "esm2_tiny.pt"
    write_fair_esm_checkpoint(path, fair_model, TINY, with_regression, cfg_as_dict)

    arch, state_dict = load_esm2_weights(path)
    assert arch == TINY
    assert not any(key.startswith("encoder.") for key in state_dict)
    loaded = build_esm2(arch).eval()
    load_state_dict_into_esm2(loaded, state_dict)

    expected, actual = fair_outputs(fair_model, tokens), fair_outputs(loaded, tokens)
    keep = residues(tokens)
    for layer in (1, TINY.num_layers):
        assert torch.equal(actual["representations"][layer][keep], expected["representations"][layer][keep])
    assert torch.equal(actual["logits"], expected["logits"])
    regression = loaded.contact_head.regression.weight
    assert torch.equal(regression, fair_model.contact_head.regression.weight) == with_regression


# Every layout a user's ESM checkpoint comes in, and how much of it the encoder keeps.
ESM_LAYOUTS = {
    "EsmModel": EsmModel,
    "EsmForMaskedLM": EsmForMaskedLM,
    "EsmForSequenceClassification": EsmForSequenceClassification,
    "EsmForTokenClassification": EsmForTokenClassification,
    "fair-esm .pt": EsmForMaskedLM,  # written in fair-esm's own file format from the converted weights
}


@pytest.mark.parametrize("layout", list(ESM_LAYOUTS))
def test_every_esm_layout_loads_as_the_encoder(layout, tokens, tmp_path, caplog):
    """A checkpoint written in each layout becomes the ProteinLLM's encoder (`load_encoder_weights`, as
    `model.encoder_weights=PATH` loads it): its representations equal transformers' EsmModel on the same
    weights. Classification heads are dropped with one log line naming them; a missing masked-LM head is
    logged and left as initialised."""
    torch.manual_seed(0)
    hf = randomize_(ESM_LAYOUTS[layout](tiny_hf_config(num_labels=3)), seed=5)
    reference = hf if isinstance(hf, EsmModel) else hf.esm  # transformers' EsmModel on these weights
    if layout == "fair-esm .pt":
        arch, fair_names = hf_esm_state_dict_to_fair_esm(hf.state_dict(), hf.config)
        fair = build_esm2(arch)
        load_state_dict_into_esm2(fair, fair_names)
        source = tmp_path / "esm2_tiny.pt"
        write_fair_esm_checkpoint(source, fair, arch, with_regression=False)
    else:
        source = tmp_path / layout
        hf.save_pretrained(source)

    model, _ = build_tiny(seed=0)
    with caplog.at_level(logging.INFO, logger="protein_llava.convert.esm_weights"):
        load_encoder_weights(model, str(source))
    head_lines = [r.getMessage() for r in caplog.records if "task head" in r.getMessage()]
    mlm_lines = [r.getMessage() for r in caplog.records if "no masked-LM head" in r.getMessage()]
    classifier = "Classification" in layout
    assert len(head_lines) == int(classifier)
    if classifier:
        assert all(key in head_lines[0] for key in hf.state_dict() if key.startswith("classifier."))
    assert len(mlm_lines) == int(layout in ("EsmModel", "EsmForSequenceClassification", "EsmForTokenClassification"))

    encoder = model.protein_encoder.eval()
    with torch.no_grad():
        features, mask = encoder(tokens)
        hidden = reference(tokens, attention_mask=residues(tokens).long(), output_hidden_states=True)
    layer = encoder.repr_layer
    expected = hidden.last_hidden_state if layer == TINY.num_layers else hidden.hidden_states[layer]
    expected = expected[:, 1 : 1 + features.shape[1]]
    torch.testing.assert_close(features[mask], expected[mask], atol=ATOL, rtol=0)


def test_part_of_a_masked_lm_head_is_refused_even_for_an_encoder(hf_model):
    _, converted = hf_esm_state_dict_to_fair_esm(hf_model.state_dict(), hf_model.config)
    del converted["lm_head.dense.weight"]
    with pytest.raises(ValueError, match="lm_head.dense.weight"):
        load_state_dict_into_esm2(build_esm2(TINY), converted, mlm_head_optional=True)


class _RunsCodeWhenUnpickled:
    """An object whose unpickling would create `marker`: exactly what weights_only must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_fair_esm_checkpoint_refuses_non_allow_listed_objects(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "code-ran"
    checkpoint = {
        "model": {"encoder.sentence_encoder.embed_tokens.weight": torch.zeros(33, 32)},
        "cfg": {"model": argparse.Namespace(encoder_layers=2)},
        "extra_state": _RunsCodeWhenUnpickled(marker),
    }
    torch.save(checkpoint, path)

    with pytest.raises(pickle.UnpicklingError):
        load_fair_esm_checkpoint(path)
    assert not marker.exists()


def test_fair_esm_checkpoint_missing_cfg_field(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": {}, "cfg": {"model": argparse.Namespace(encoder_layers=2, encoder_embed_dim=32)}}, path)
    with pytest.raises(ValueError, match="encoder_attention_heads"):
        load_fair_esm_checkpoint(path)


def test_download_uses_cached_file(fair_model, tokens, tmp_path, monkeypatch):
    """A file already in torch hub's checkpoint cache is loaded without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "esm2_t6_8M_UR50D"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    assert cached.is_relative_to(tmp_path)
    cached.parent.mkdir(parents=True)
    write_fair_esm_checkpoint(cached, fair_model, TINY, with_regression=False)

    for arch, state_dict in (download_fair_esm(name), load_esm2_weights(name)):
        assert arch == TINY
        loaded = build_esm2(arch).eval()
        load_state_dict_into_esm2(loaded, state_dict)
        assert torch.equal(fair_outputs(loaded, tokens)["logits"], fair_outputs(fair_model, tokens)["logits"])


@pytest.mark.parametrize("load", [download_fair_esm, load_esm2_weights])
def test_unknown_pretrained_name_lists_valid_names(load):
    with pytest.raises(ValueError) as error:
        load("esm2_t99_1T_UR50D")
    for name in FAIR_ESM2_PRETRAINED:
        assert name in str(error.value)


def test_existing_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.pt checkpoint or a Hugging Face model folder"):
        load_esm2_weights(path)


def test_missing_key_is_named(fair_model):
    state_dict = dict(fair_model.state_dict())
    del state_dict["layers.1.fc1.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.fc1\.weight'\]"):
        load_state_dict_into_esm2(build_esm2(TINY), state_dict)


def test_unexpected_key_is_named(fair_model):
    state_dict = dict(fair_model.state_dict())
    state_dict["layers.0.self_attn.bias_k"] = torch.zeros(1, 1, TINY.embed_dim)
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.0\.self_attn\.bias_k'\]"):
        load_state_dict_into_esm2(build_esm2(TINY), state_dict)


def test_untied_lm_head_is_refused(fair_model):
    state_dict = dict(fair_model.state_dict())
    state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_state_dict_into_esm2(build_esm2(TINY), state_dict)


def test_unknown_hf_key_is_named(hf_model):
    state_dict = dict(hf_model.state_dict())
    state_dict["esm.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="esm.encoder.layer.0.attention.self.distance_embedding.weight"):
        hf_esm_state_dict_to_fair_esm(state_dict, hf_model.config)


def test_untied_hf_decoder_is_refused(hf_model):
    state_dict = dict(hf_model.state_dict())
    state_dict["lm_head.decoder.weight"] = state_dict["esm.embeddings.word_embeddings.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.decoder.weight"):
        hf_esm_state_dict_to_fair_esm(state_dict, hf_model.config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("position_embedding_type", "absolute"),
        ("emb_layer_norm_before", True),
        ("vocab_size", 34),
        ("layer_norm_eps", 1e-12),
        ("intermediate_size", 100),
        ("mask_token_id", 31),
        ("rope_theta", 500000.0),
    ],
)
def test_unrepresentable_hf_config_is_refused(hf_model, field, value):
    config = json.loads(hf_model.config.to_json_string())
    config[field] = value
    with pytest.raises(ValueError, match=field):
        hf_esm_state_dict_to_fair_esm(hf_model.state_dict(), config)


def test_non_rotary_hf_folder_is_refused(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["position_embedding_type"] = "absolute"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="position_embedding_type"):
        load_esm2_weights(tmp_path)


def test_architecture_validates_itself():
    with pytest.raises(ValueError, match="divisible"):
        ESM2Architecture(num_layers=2, embed_dim=30, attention_heads=4, token_dropout=True)
