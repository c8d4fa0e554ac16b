"""Every YAML under configs/train composes and yields objects the run can build (no config rots)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from protein_llava.configuration import PRESET_NAMES
from protein_llava.training.run import _build_strategy, check_config, max_steps, optim_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "train"
GROUPS = {group: sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")) for group in ("model", "data", "trainer")}


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options])
@pytest.mark.parametrize("stage", [1, 2])
def test_every_option_composes_and_resolves(group, option, stage):
    overrides = [f"stage={stage}", f"{group}={option}"]
    if group == "data" and option == "local":
        overrides.append("data.path=somefile.jsonl")
    cfg = compose_train(overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["stage"] == stage
    assert container["model"]["preset"] in PRESET_NAMES
    assert optim_config(cfg).total_steps == max_steps(cfg) >= 1
    strategy = container["trainer"]["strategy"]
    if isinstance(strategy, dict) and strategy["name"] == "fsdp":
        assert type(_build_strategy(dict(strategy))).__name__ == "FSDPStrategy"
    elif isinstance(strategy, dict):
        assert strategy["name"] == "deepspeed" and strategy["stage"] in (2, 3)


def test_literal_stage_commands_are_plain_keys():
    assert compose_train(["stage=1"]).run_name == "smollm2-demo-stage1"
    assert compose_train(["stage=2", "model=text-only"]).run_name == "text-only-stage2"
    with pytest.raises(ValueError, match="stage must be 1 or 2, got 3"):
        check_config(compose_train(["stage=3", "model=tiny"]))


def test_trainer_max_steps_override_wins():
    cfg = compose_train(["stage=1", "trainer.max_steps=7"])
    assert max_steps(cfg) == 7 and optim_config(cfg).total_steps == 7
    assert max_steps(compose_train(["stage=2"])) == compose_train(["stage=2"]).stage2.max_steps


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["model.dtype=float8"], ValueError, "model.dtype must be one of"),
        (["data=local", "data.path=/nonexistent/data.jsonl"], FileNotFoundError, "data.path=/nonexistent/data.jsonl"),
        (["model.decoder=/nonexistent/decoder"], FileNotFoundError, "model.decoder=/nonexistent/decoder"),
        (["resume=/nonexistent/x.ckpt"], FileNotFoundError, "resume=/nonexistent/x.ckpt"),
        (["stage1.lr=-1"], ValueError, "lr must be > 0"),
        (["model.attn_implementation=flash_attention_2"], ImportError, "flash-attn"),
    ],
)
def test_bad_settings_are_named_before_loading(overrides, error, message):
    from transformers.utils import is_flash_attn_2_available

    if "flash" in message and is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(error, match=message):
        check_config(compose_train(["stage=1", "model=tiny", *overrides]))
