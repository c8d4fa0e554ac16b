"""The learning experiment's machinery on the tiny preset: held-out scoring during training, the results'
layout (arm → question type → accuracy, CI, n), the curves, and the summary over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protein_llava.data.demo import QUESTION_TYPES
from protein_llava.experiment.learning import (
    ExperimentConfig,
    eval_steps,
    multimodal_encoder,
    run_experiment,
    summarize_seeds,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "train"
ENTRY_KEYS = {"accuracy", "ci95", "n", "chance"}


def test_eval_steps_include_the_start_and_the_end():
    assert eval_steps(10, 4) == [0, 4, 8, 10]
    assert eval_steps(8, 4) == [0, 4, 8]
    with pytest.raises(ValueError, match="unknown arms"):
        ExperimentConfig(arms=("multimodal", "vision"), train_config_dir=str(CONFIG_DIR))
    with pytest.raises(ValueError, match="stage2_steps must be >= 1"):
        ExperimentConfig(stage2_steps=0, train_config_dir=str(CONFIG_DIR))
    with pytest.raises(ValueError, match="contrast_weight must be >= 0"):
        ExperimentConfig(contrast_weight=-1.0, train_config_dir=str(CONFIG_DIR))
    with pytest.raises(ValueError, match="reaches the text-only arm"):
        ExperimentConfig(train_overrides=("stage2.contrast_weight=1.0",), train_config_dir=str(CONFIG_DIR))


# Session scope: `make test` runs pytest-xdist workers, which interleave modules; a module-scoped run would
# be torn down and built again when a test of its module comes back to a worker.
@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "seed3"
    config = ExperimentConfig(
        seed=3,
        out=str(out),
        train_config_dir=str(CONFIG_DIR),
        num_train=24,
        num_heldout=16,
        heldout_items=32,
        stage1_steps=2,
        stage2_steps=3,
        eval_every=2,
        contrast_weight=1.0,
        arms=("multimodal", "text_only", "multimodal_encoder_lora"),
        train_overrides=("model.preset=tiny", "trainer.log_every_n_steps=1"),
    )
    return out, run_experiment(config)


@pytest.mark.slow
def test_results_are_keyed_by_arm_and_question_type(tiny_experiment):
    out, results = tiny_experiment
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    trained = ("multimodal", "text_only", "multimodal_encoder_lora")
    expected = {f"{arm}{suffix}" for arm in (*trained, "retrieval", "probe") for suffix in ("", "_ablated")}
    assert set(results["arms"]) == expected
    types = results["question_types"]
    assert set(types) <= set(QUESTION_TYPES) and "function" in types
    for arm, by_type in results["arms"].items():
        assert set(by_type) == {"all", *types}, arm
        assert all(set(entry) == ENTRY_KEYS for entry in by_type.values())
        assert by_type["all"]["n"] == results["n_items"] == sum(by_type[t]["n"] for t in types)
    assert 0 <= results["identity"]["min"] <= results["identity"]["median"] <= results["identity"]["max"] <= 1
    tests = results["mcnemar"]
    assert set(tests) == {"multimodal vs text_only", "multimodal_encoder_lora vs text_only",
                          *(f"{arm} vs {arm}_ablated" for arm in trained)}
    for test in tests.values():
        assert 0 <= test["p_value"] <= 1 and test["only_first"] + test["only_second"] <= results["n_items"]
    # The discordant counts are the arms' accuracies apart: right-only-in-first minus right-only-in-second.
    first = results["arms"]["multimodal"]["all"]["accuracy"] - results["arms"]["text_only"]["all"]["accuracy"]
    pair = tests["multimodal vs text_only"]
    assert round(first * results["n_items"]) == pair["only_first"] - pair["only_second"]
    assert "Exact McNemar, multimodal vs text_only: p = " in (out / "report.md").read_text()
    # Training read the very files the benchmark was built from (same manifest: nothing was rewritten).
    manifest = json.loads((out / "demo-data" / "manifest.json").read_text())
    assert (manifest["num_train"], manifest["num_heldout"], manifest["seed"]) == (24, 16, 3)


@pytest.mark.slow
def test_held_out_accuracy_is_recorded_at_fixed_steps_on_one_axis(tiny_experiment):
    _, results = tiny_experiment
    # Multimodal: stage 1 steps 0, 2 then stage 2 continues the axis (2 + 2 = 4, 2 + 3 = 5).
    assert [r["step"] for r in results["curves"]["multimodal"]] == [0, 2, 4, 5]
    assert [r["step"] for r in results["curves"]["text_only"]] == [0, 2, 4, 5]
    # The encoder-LoRA arm reuses the multimodal arm's stage 1, so only its stage-2 points are new.
    assert [r["step"] for r in results["curves"]["multimodal_encoder_lora"]] == [4, 5]


@pytest.mark.slow
def test_report_curves_and_summary_are_written(tiny_experiment):
    out, results = tiny_experiment
    report = (out / "report.md").read_text()
    assert "| multimodal_ablated |" in report and "| retrieval |" in report and "| probe_ablated |" in report
    assert (out / "curves.png").stat().st_size > 10_000
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["seeds"] == [3]
    entry = summary["arms"]["multimodal"]["function"]
    assert entry["per_seed"] == [results["arms"]["multimodal"]["function"]["accuracy"]] and entry["mean_accuracy"] == entry["per_seed"][0]


@pytest.mark.slow
def test_probe_encoder_is_the_multimodal_arms_frozen_encoder(tiny_experiment):
    """The probe's encoder, built as training builds the arm, equals bit for bit the encoder the multimodal arm
    exported after stage 2 (frozen), and differs from the encoder-LoRA arm's (trained), so the check can fail."""
    out, results = tiny_experiment
    config = ExperimentConfig(**{**results["settings"], "train_config_dir": str(CONFIG_DIR)})
    encoder = multimodal_encoder(config).state_dict()

    def exported(arm: str) -> dict[str, torch.Tensor]:
        tensors = load_file(out / arm / "stage2" / "export" / "model.safetensors")
        return {k.removeprefix("protein_encoder."): v for k, v in tensors.items() if k.startswith("protein_encoder.")}

    frozen = exported("multimodal")
    shared = sorted(set(encoder) & set(frozen))
    assert len(shared) > 20 and all(k.startswith("esm.") for k in shared)
    assert all(torch.equal(encoder[k], frozen[k]) for k in shared)
    trained = exported("multimodal_encoder_lora")
    assert not all(torch.equal(encoder[k], trained[k]) for k in shared)


def test_summary_averages_the_seeds(tmp_path):
    def write(seed: int, accuracy: float, arms=("multimodal",)):
        entry = {"accuracy": accuracy, "ci95": [accuracy - 0.1, accuracy + 0.1], "n": 10, "chance": 0.25}
        results = {
            "seed": seed,
            "question_types": ["function"],
            "arms": {arm: {"all": entry, "function": entry} for arm in arms},
            "wall_seconds": {"total": 60.0 * (seed + 1)},
        }
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(results))

    write(0, 0.5)
    write(1, 0.7, arms=("multimodal", "probe"))  # a seed run after the probe arm was added
    summary = summarize_seeds(tmp_path)
    assert summary["seeds"] == [0, 1]
    assert summary["arms"]["multimodal"]["function"]["mean_accuracy"] == pytest.approx(0.6)
    assert summary["arms"]["probe"]["function"]["per_seed"] == [0.7] and summary["arms"]["probe"]["function"]["n_per_seed"] == 10
    assert summary["wall_minutes_per_seed"] == [1.0, 2.0]
    assert "60.0% (50.0, 70.0)" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_contrast_reaches_the_multimodal_arms_only(tiny_experiment):
    """contrast_weight turns on the swap-contrast loss (it logs train/swap_gap) in the multimodal arms' stage 2,
    never in their stage 1 or in the text-only arm, which has no protein to swap."""
    import csv

    out, results = tiny_experiment

    def logged_swap_gap(run: str) -> bool:
        rows = list(csv.DictReader((out / run / "logs" / "metrics.csv").open()))
        return any(row.get("train/swap_gap") not in (None, "") for row in rows)

    assert logged_swap_gap("multimodal/stage2") and logged_swap_gap("multimodal_encoder_lora/stage2")
    assert not logged_swap_gap("multimodal/stage1") and not logged_swap_gap("text_only")
    assert "with swap-contrast weight 1" in (out / "report.md").read_text()


@pytest.mark.slow
def test_predictions_pair_the_arms_item_by_item(tiny_experiment):
    out, results = tiny_experiment
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    trained = {name for name in results["arms"] if not name.startswith(("retrieval", "probe"))}
    assert {row["arm"] for row in rows} == trained
    for name in trained:
        mine = [row for row in rows if row["arm"] == name]
        assert len(mine) == len({row["item_id"] for row in mine}) == results["n_items"]
        accuracy = sum(row["correct"] for row in mine) / len(mine)
        assert accuracy == pytest.approx(results["arms"][name]["all"]["accuracy"])
