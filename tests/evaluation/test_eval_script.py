"""eval.py end to end (forked processes, tiny saved models) and every eval config composed into an EvalConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from script_runs import ForkedRun, forked_script, run_script

from protein_llava.builders import build_tiny
from protein_llava.evaluation.config import (
    BENCHMARK_NAMES, DEMO_BASELINE, DEMO_HELDOUT, DEMO_MODEL, DEMO_TRAIN, EvalConfig, compose_eval_config,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "eval"
ARM_KEYS = {"accuracy", "ci95", "n_scored", "n_flagged", "mcnemar_p"}


def run_eval(*overrides: str, logs: Path, cwd: Path = ROOT) -> ForkedRun:
    """`python eval.py OVERRIDES`, forked from a preloaded process (tests/script_runs.py); test_eval_end_to_end
    runs the literal command."""
    return forked_script(ROOT / "eval.py", overrides, logs, cwd=cwd)


def compose_config(*overrides: str) -> EvalConfig:
    cfg = compose_eval_config(overrides)
    return EvalConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize("benchmark", sorted(p.stem for p in (CONFIG_DIR / "benchmark").glob("*.yaml")))
def test_every_config_composes(benchmark):
    config = compose_config(f"benchmark={benchmark}")
    assert config.benchmark.name in BENCHMARK_NAMES and config.benchmark.label == benchmark
    assert config.out == f"checkpoints/eval/{benchmark}"


def test_defaults_are_the_demo():
    config = compose_config()
    # The demo scores what SFT trained (each option's text as the reply), with the protein-ablation control.
    assert (config.model, config.baseline, config.mode, config.prompt_format) == (DEMO_MODEL, DEMO_BASELINE, "description", "raw")
    assert (config.ablation, config.benchmark.retrieval, config.benchmark.probe) == ("shuffle", True, True)
    assert compose_config("benchmark=scl2205").benchmark.probe and not compose_config("benchmark=proteinlmbench").benchmark.probe
    assert compose_config("benchmark=proteinlmbench").mode == "loglik"
    assert compose_config("benchmark=proteinlmbench").ablation == "none"
    assert (config.benchmark.name, config.benchmark.path, config.benchmark.train_paths) == (
        "sequence_grounded", DEMO_HELDOUT, [DEMO_TRAIN],
    )
    assert compose_config("baseline=null").arm_sources() == {"model": DEMO_MODEL}
    with pytest.raises(ValueError, match="permutations=true .* needs mode=loglik"):
        compose_config("mode=generate", "permutations=true")


def test_defaults_have_one_home():
    # Only the benchmark group's file adds values: every other default is the dataclass's, Hydra or not.
    composed = compose_config()
    assert composed == EvalConfig(benchmark=composed.benchmark)
    assert EvalConfig(model="m").out == "checkpoints/eval/sequence_grounded"
    assert EvalConfig(model="m").mode == "loglik"  # BenchmarkConfig's own default_mode
    with pytest.raises(ValueError, match="unknown eval config keys"):
        EvalConfig.from_dict(OmegaConf.to_container(compose_eval_config(["+limt=3"]), resolve=True))


@pytest.mark.slow
def test_eval_end_to_end(tmp_path):
    model, processor = build_tiny(seed=0)
    model.save_pretrained(tmp_path / "multimodal")
    processor.save_pretrained(tmp_path / "multimodal")
    model.language_model.save_pretrained(tmp_path / "text")
    processor.tokenizer.save_pretrained(tmp_path / "text")
    items = [
        {"question": f"Q{i}?", "options": [f"option {n}: t{n}" for n in range(1, 4)], "answer": f"option {1 + i % 3}"}
        for i in range(4)
    ]
    items.append({"question": "bad", "options": ["option 1: a", "option 2: b"], "answer": "option 5"})
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(items))
    out = tmp_path / "out"
    result = run_script(ROOT / "eval.py", [  # a new interpreter, as a user runs it
        "benchmark=proteinlmbench", f"benchmark.path={bench}", f"model={tmp_path / 'multimodal'}",
        f"baseline={tmp_path / 'text'}", "mode=loglik", "limit=5", f"out={out}", "bootstrap_samples=100",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == {"model", "baseline"}
    for arm in report["arms"].values():
        assert ARM_KEYS <= set(arm)
        assert arm["n_scored"] == 4 and arm["n_flagged"] == 1
    assert 0.0 <= report["mcnemar_p"] <= 1.0
    for name in ("report.md", "report.png", "predictions.jsonl", "flagged.jsonl"):
        assert (out / name).stat().st_size > 0
    assert "model (multimodal): accuracy" in result.stdout and "baseline (text-only): accuracy" in result.stdout


@pytest.mark.slow
def test_missing_model_is_one_clear_error(tmp_path):
    # Run where the demo checkpoints do not exist: the default model path is named, nothing heavy loads.
    result = run_eval(cwd=tmp_path, logs=tmp_path / "logs")
    assert result.returncode == 1
    assert f"eval.py: model folder {DEMO_MODEL} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def demo_benchmark(folder: Path) -> list[str]:
    from protein_llava.data.demo import write_demo_dataset

    paths = write_demo_dataset(folder, num_train=40, num_heldout=8, seed=0)
    return [f"benchmark.path={paths['heldout']}", f"benchmark.train_paths=[{paths['train']}]"]


@pytest.mark.slow
def test_eval_sequence_grounded_prints_the_probe_beside_its_ablation(tmp_path, tiny_folder):
    data = demo_benchmark(tmp_path / "demo")
    result = run_eval(*data, f"model={tiny_folder}", "baseline=null", "limit=8", f"out={tmp_path / 'out'}", "bootstrap_samples=50",
                      logs=tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads((tmp_path / "out" / "report.json").read_text())["arms"]) == {
        f"{arm}{suffix}" for arm in ("model", "retrieval", "probe") for suffix in ("", "_ablated")
    }
    assert "probe (linear probe): accuracy" in result.stdout and "; protein-ablated" in result.stdout.split("probe (linear probe)")[1]


@pytest.mark.slow
def test_probe_with_a_text_only_model_is_one_clear_error(tmp_path):
    # A text-only model has no encoder for the probe: one line naming the key, before anything loads.
    text_only = run_eval(*demo_benchmark(tmp_path / "demo"), "model=smollm2", "baseline=null", f"out={tmp_path / 'text'}",
                         logs=tmp_path / "logs")
    assert text_only.returncode == 1 and "Traceback" not in text_only.stderr
    assert "eval.py: benchmark.probe=true fits its classifiers on the model's own protein encoder" in text_only.stderr
    assert not (tmp_path / "text").exists()
