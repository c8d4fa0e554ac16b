import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig

import protein_llava  # noqa: F401  (registers the Auto classes)
from protein_llava.builders import build_preset
from protein_llava.model.configuration import (
    PRESET_NAMES,
    PRESETS_DIR,
    ProjectorConfig,
    ProteinEncoderConfig,
    ProteinLLMConfig,
    load_preset,
    num_protein_tokens,
)
from protein_llava.model.modeling import ProteinLLM


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


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "train" / "model"


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_shipped_preset_loads_and_builds(name):
    preset = load_preset(name)
    assert preset.name == name and preset.description and PRESETS_DIR / f"{name}.json" in PRESETS_DIR.glob("*.json")
    config = preset.model_config()
    assert config.text_config.model_type == preset.config["text_config"]["model_type"]
    for key, value in preset.config["encoder_config"].items():
        assert getattr(config.encoder_config, key) == value  # what the file says is what the config holds
    # Every preset builds; the large ones on the meta device (shapes only, no memory), checked by parameter count.
    with torch.device("meta"):
        model = ProteinLLM(config)
    text, encoder = config.text_config, config.encoder_config
    decoder_layers = text.num_hidden_layers * sum(p.numel() for p in model.language_model.model.layers[0].parameters())
    assert sum(p.numel() for p in model.language_model.parameters()) > decoder_layers
    encoder_layers = encoder.num_layers * sum(p.numel() for p in model.protein_encoder.esm.layers[0].parameters())
    assert sum(p.numel() for p in model.protein_encoder.parameters()) > encoder_layers
    if preset.decoder_source == "random":  # the tiny ones build for real, with their tokenizer
        built, processor = build_preset(name)
        # The one difference: the builder fills pad_token_id from the tokenizer when the preset leaves it null.
        assert {**built.config.text_config.to_dict(), "pad_token_id": None} == config.text_config.to_dict()
        assert processor.max_residues == config.encoder_config.max_residues


def test_the_target_preset_has_the_size_of_esm2_650m_and_a_7b_decoder():
    with torch.device("meta"):
        model = ProteinLLM(ProteinLLMConfig.from_preset("esm2-650m-internlm2-7b"))
    encoder = sum(p.numel() for p in model.protein_encoder.parameters())
    decoder = sum(p.numel() for p in model.language_model.parameters())
    assert 640e6 < encoder < 660e6 and 7.5e9 < decoder < 7.8e9


def test_a_preset_file_is_validated(tmp_path):
    good = json.loads((PRESETS_DIR / "tiny.json").read_text())
    (tmp_path / "copy.json").write_text(json.dumps(good))
    assert load_preset("copy", tmp_path).model_config().to_dict() == ProteinLLMConfig.from_preset("tiny").to_dict()
    (tmp_path / "typo.json").write_text(json.dumps({**good, "decodr": "random"}))
    with pytest.raises(ValueError, match="keys must be"):
        load_preset("typo", tmp_path)
    (tmp_path / "kind.json").write_text(json.dumps({**good, "decoder_source": "hub"}))
    with pytest.raises(ValueError, match="preset 'kind': decoder_source must be one of"):
        load_preset("kind", tmp_path)
    (tmp_path / "shape.json").write_text(json.dumps({**good, "config": {**good["config"], "encoder_config": {"num_layers": 0}}}))
    with pytest.raises(StrictDataclassClassValidationError, match="num_layers must be >= 1"):
        load_preset("shape", tmp_path).model_config()
    with pytest.raises(ValueError, match=r"unknown preset 'tiny'; choose one of \('copy', 'kind', 'shape', 'typo'\)"):
        load_preset("tiny", tmp_path)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_yaml_model_configs_only_pick_a_preset_and_paths(path):
    """One home per preset: a model group names its preset and the run's choices around it (a decoder folder,
    encoder weights, kernels), never what the preset's JSON says (shapes, projector, dtype)."""
    model = yaml.safe_load(path.read_text())
    preset = load_preset(model["preset"])
    assert set(model) <= {"name", "preset", "text_only", "decoder", "encoder_weights", "attn_implementation"}
    if not model.get("text_only", False):
        assert model["name"] == model["preset"]  # a multimodal model group is its preset
    assert model.get("encoder_weights") in (None, preset.pretrained_encoder)
    if preset.decoder_source == "folder":
        assert model.get("decoder"), f"{path.name}: preset {preset.name!r} needs a decoder folder"
    else:
        assert model.get("decoder") is None


def test_the_demo_preset_holds_the_demo_projector():
    """The recipe of issue #20 is the smollm2-demo preset's own projector, not a YAML override."""
    projector = ProteinLLMConfig.from_preset("smollm2-demo").projector_config
    assert (projector.token_reduction, projector.pool_stride, projector.summary_token, projector.output_norm) == ("mean_pool", 2, True, "rms")


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


def test_a_run_picks_the_encoder_layer_the_projector_reads(tmp_path):
    """`model.encoder_repr_layer=N` reaches the built encoder (and its saved config); out of range is refused."""
    from protein_llava.training.config import compose_train_config
    from protein_llava.training.plan import resolve_plan
    from protein_llava.training.run import build_model

    plan = resolve_plan(compose_train_config(["stage=1", "model=tiny", "model.encoder_repr_layer=1", f"checkpoints_dir={tmp_path}"]))
    model, _, _ = build_model(plan)
    assert model.protein_encoder.repr_layer == 1 == model.config.encoder_config.repr_layer
    with pytest.raises(ValueError, match="encoder_config.repr_layer must be in"):
        build_preset("tiny", encoder_repr_layer=3)


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
