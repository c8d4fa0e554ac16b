"""Every YAML under configs/train composes into the typed schema and yields a plan the run can follow."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

from protein_llava.model.configuration import PRESET_NAMES
from protein_llava.training.config import CONFIG_DIR, ModelSettings, TrainConfig, compose_train_config, to_train_config
from protein_llava.training.plan import optim_config, resolve_plan
from protein_llava.training.run import _build_strategy

GROUPS = {group: sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")) for group in ("model", "data", "trainer")}
compose_train = compose_train_config


def test_the_schema_is_the_shipped_config_dir():
    assert CONFIG_DIR == Path(__file__).resolve().parents[2] / "configs" / "train"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options])
@pytest.mark.parametrize("stage", [1, 2])
def test_every_option_composes_and_resolves(group, option, stage):
    overrides = [f"stage={stage}", f"{group}={option}"]
    if group == "data" and option == "local":
        overrides.append("data.path=somefile.jsonl")
    if group == "model" and option == "text-only" and stage == 1:
        with pytest.raises(ValueError, match="model=text-only has no projector to align: run it as stage=2"):
            to_train_config(compose_train(overrides))
        return
    config = to_train_config(compose_train(overrides))
    assert isinstance(config, TrainConfig) and config.stage == stage
    assert config.model.preset in PRESET_NAMES
    assert optim_config(config).total_steps == config.max_steps >= 1
    strategy = config.trainer.strategy
    if isinstance(strategy, dict):
        assert strategy["name"] == "fsdp" and type(_build_strategy(dict(strategy))).__name__ == "FSDP2Strategy"


def test_literal_stage_commands_are_plain_keys():
    assert compose_train(["stage=1"]).run_name == "smollm2-demo-stage1"
    assert compose_train(["stage=2", "model=text-only"]).run_name == "text-only-stage2"
    # The interpolation and the function that stage 2 and `export` find stage 1 by spell one name.
    from protein_llava.training.config import default_run_name

    for stage, model in ((1, "tiny"), (2, "smollm2-demo"), (2, "text-only")):
        assert compose_train([f"stage={stage}", f"model={model}"]).run_name == default_run_name(model, stage)
    with pytest.raises(ValueError, match="stage must be one of 1, 2; got 3"):
        resolve_plan(compose_train(["stage=3", "model=tiny"]))


def test_a_config_built_in_python_resolves_like_a_composed_one():
    config = TrainConfig(model=ModelSettings(name="tiny", preset="tiny"), stage=2, checkpoints_dir="/runs")
    resolved = to_train_config(config)
    assert (resolved.run_name, resolved.out, resolved.data.demo_dir) == ("tiny-stage2", "/runs/tiny-stage2", "/runs/demo-data")
    assert resolved == to_train_config(compose_train(["model=tiny", "stage=2", "checkpoints_dir=/runs"]))


def test_the_model_group_takes_dtype_and_projector_from_the_preset():
    demo = to_train_config(compose_train(["stage=1"]))
    assert demo.model.dtype is None and demo.model.resolved_dtype() == "float32"
    assert demo.model.projector.as_dict() == {}
    target = to_train_config(compose_train(["stage=1", "model=esm2-650m-internlm2-7b"]))
    assert target.model.resolved_dtype() == "bfloat16"  # the preset's, written nowhere else
    overridden = to_train_config(compose_train(["stage=1", "model.dtype=bfloat16", "model.projector.pool_stride=4"]))
    assert overridden.model.resolved_dtype() == "bfloat16" and overridden.model.projector.as_dict() == {"pool_stride": 4}


def test_trainer_max_steps_override_wins():
    config = to_train_config(compose_train(["stage=1", "trainer.max_steps=7"]))
    assert config.max_steps == 7 and optim_config(config).total_steps == 7
    config = to_train_config(compose_train(["stage=2"]))
    assert config.max_steps == config.stage2.max_steps == 60


def test_defaults_have_one_home():
    # The default groups' files add nothing to the schema's defaults: composing them equals the bare schema.
    composed = OmegaConf.to_container(compose_train(["model=tiny"]), resolve=True)
    schema = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"model": {"name": "tiny", "preset": "tiny"}})
    assert composed == OmegaConf.to_container(schema, resolve=True)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["model.dtype=float8"], ValueError, "model.dtype must be one of"),
        (["model.projector.token_reduction=pixels"], ValueError, "model.projector: unknown token_reduction 'pixels'"),
        (["model.projector.pool_stride=0"], ValueError, "model.projector: .*pool_stride"),
        (["data=local", "data.path=/nonexistent/data.jsonl"], FileNotFoundError, "data.path=/nonexistent/data.jsonl"),
        (["model.decoder=/nonexistent/decoder"], FileNotFoundError, "model.decoder=/nonexistent/decoder"),
        (["resume=/nonexistent/x.ckpt"], FileNotFoundError, "resume=/nonexistent/x.ckpt"),
        (["stage1.lr=-1"], ValueError, "stage1.lr must be > 0"),
        (["data.batching=packed", "data.pack_length=100"], ValueError, r"data.batching=packed needs data.pack_length >= data.max_length \(512\), got 100"),
        (["data.batch_size=0"], ValueError, "data.batch_size must be >= 1, got 0"),
        (["stage=2", "stage2.llm=partial"], ValueError, "stage2.llm must be one of lora, qlora, full, frozen; got 'partial'"),
        (["logger=mlflow"], ValueError, "logger must be one of csv, tensorboard, wandb"),
        (["model.attn_implementation=flash_attention_2"], ImportError, "flash-attn"),
    ],
)
def test_bad_settings_are_named_before_loading(overrides, error, message):
    from transformers.utils import is_flash_attn_2_available

    if "flash" in message and is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(error, match=message):
        resolve_plan(compose_train(["stage=1", "model=tiny", *overrides]))


def test_wrong_types_and_unknown_keys_fail_at_composition_naming_the_key():
    with pytest.raises(Exception, match="stage1.lr") as info:
        compose_train(["stage1.lr=fast"])
    assert "could not be converted to Float" in str(info.value.__cause__) and "full_key: stage1.lr" in str(info.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train(["trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match="token_reductoin"):
        compose_train(["model.projector.token_reductoin=none"])
    # Hydra's `+` adds the key anyway; turning the config into objects refuses it rather than drop it.
    with pytest.raises(ValueError, match="unknown key trainer.max_stepz: TrainerSettings has"):
        to_train_config(compose_train(["+trainer.max_stepz=3"]))


def test_projector_overrides_name_exactly_the_projector_configs_fields():
    """`model.projector.*` (typed here) and `ProteinLLMConfig.with_projector` (the core) take the same
    names, and they are ProjectorConfig's own: a field added to one and not the others fails here."""
    import dataclasses
    import inspect

    from protein_llava.model.configuration import PROJECTOR_FIELDS, ProjectorConfig
    from protein_llava.training.config import ProjectorOverrides

    assert [f.name for f in dataclasses.fields(ProjectorOverrides)] == list(PROJECTOR_FIELDS)
    config_fields = set(inspect.signature(ProjectorConfig).parameters) - {"kwargs", "args"}
    assert set(PROJECTOR_FIELDS) <= config_fields
    defaults = ProjectorConfig()
    assert all(hasattr(defaults, name) for name in PROJECTOR_FIELDS)
