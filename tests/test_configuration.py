import json

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig

import protein_llava  # noqa: F401  (registers the Auto classes)
from protein_llava.configuration import (
    PRESET_NAMES,
    ProjectorConfig,
    ProteinEncoderConfig,
    ProteinLLMConfig,
    num_protein_tokens,
)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_round_trip_through_json(name, tmp_path):
    config = ProteinLLMConfig.from_preset(name)
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, ProteinLLMConfig)
    assert again.encoder_config.to_dict() == config.encoder_config.to_dict()
    assert again.projector_config.to_dict() == config.projector_config.to_dict()
    assert again.text_config.to_dict() == config.text_config.to_dict()


def test_preset_shapes():
    target = ProteinLLMConfig.from_preset("esm2-650m-internlm2-7b")
    assert (target.encoder_config.num_layers, target.encoder_config.embed_dim) == (33, 1280)
    assert (target.text_config.hidden_size, target.text_config.num_hidden_layers, target.text_config.vocab_size) == (
        4096,
        32,
        92544,
    )
    demo = ProteinLLMConfig.from_preset("smollm2-demo")
    assert (demo.encoder_config.num_layers, demo.encoder_config.embed_dim) == (6, 320)
    assert demo.text_config.hidden_size == 576


def test_unknown_preset_and_override_named():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        ProteinLLMConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="unknown ProteinLLMConfig field 'colour'"):
        ProteinLLMConfig.from_preset("tiny", colour="red")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 30, "attention_heads": 4}, "embed_dim \\(30\\) must be divisible"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"num_layers": 2, "repr_layer": 5}, "repr_layer must be in \\[-3, 2\\]"),
    ],
)
def test_encoder_config_validation(kwargs, message):
    # transformers' strict configs wrap validator errors in StrictDataclassClassValidationError.
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        ProteinEncoderConfig(**kwargs)


def test_repr_layer_resolution():
    assert ProteinEncoderConfig(num_layers=6, repr_layer=-1).resolved_repr_layer == 6
    assert ProteinEncoderConfig(num_layers=6, repr_layer=-2).resolved_repr_layer == 5
    assert ProteinEncoderConfig(num_layers=6, repr_layer=3).resolved_repr_layer == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"projector_type": "transformer"}, "unknown projector type 'transformer'"),
        ({"token_reduction": "max_pool"}, "token_reduction"),
        ({"pool_stride": 0}, "pool_stride must be >= 1"),
    ],
)
def test_projector_config_validation(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        ProjectorConfig(**kwargs)


def test_num_protein_tokens():
    assert num_protein_tokens(10, ProjectorConfig(token_reduction="none")) == 10
    assert num_protein_tokens(10, ProjectorConfig(token_reduction="mean_pool", pool_stride=4)) == 3
    assert num_protein_tokens(8, ProjectorConfig(token_reduction="mean_pool", pool_stride=4)) == 2
    assert num_protein_tokens(1000, ProjectorConfig(token_reduction="resampler", num_latents=16)) == 16
    with pytest.raises(ValueError, match="at least one residue"):
        num_protein_tokens(0, ProjectorConfig())


def test_config_json_is_one_self_describing_file(tmp_path):
    ProteinLLMConfig.from_preset("tiny").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "protein_llava"
    assert saved["encoder_config"]["model_type"] == "protein_llava_encoder"
    assert saved["text_config"]["model_type"] == "llama"
