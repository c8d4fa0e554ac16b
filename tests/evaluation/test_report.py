"""Tests for protein_llava.evaluation.report: pairing, the numbers in report.json, and the files written."""

from __future__ import annotations

import json

from protein_llava.evaluation.benchmarks import Benchmark, BenchmarkItem, FlaggedItem
from protein_llava.evaluation.config import EvalConfig
from protein_llava.evaluation.report import build_report, write_report
from protein_llava.evaluation.report import ArmResult

ARM_KEYS = {"accuracy", "ci95", "n_scored", "n_flagged", "n_unparseable", "predicted_distribution", "mcnemar_p"}


def make_item(index: int, num_options: int = 4, answer: int = 1) -> BenchmarkItem:
    return BenchmarkItem(f"b[{index}]", f"q{index}", tuple(f"option {n}: t" for n in range(1, num_options + 1)), answer)


def prediction(item: BenchmarkItem, predicted: int | None) -> dict:
    return {
        "item_id": item.item_id, "num_options": item.num_options, "answer": item.answer, "predicted": predicted,
        "correct": predicted == item.answer, "unparseable": predicted is None,
    }


def fake_run():
    items = [make_item(i, num_options=2 if i % 2 else 4) for i in range(6)]
    benchmark = Benchmark("proteinlmbench", "bench.json", items, [FlaggedItem("b[9]", "answer_not_in_options", "x")])
    model = ArmResult("model", "m", True, {i.item_id: prediction(i, 1) for i in items})
    baseline_predictions = [1, 2, None, 3, 2, 1]  # right on b[0] and b[5]
    baseline = ArmResult("baseline", "smollm2", False, {i.item_id: prediction(i, p) for i, p in zip(items, baseline_predictions)})
    # The multimodal arm could not read b[5]: it leaves the score for both arms.
    model.unreadable.append(FlaggedItem("b[5]", "bad_sequence", "model cannot read it"))
    del model.predictions["b[5]"]
    return benchmark, [model, baseline]


def test_report_pairs_arms_and_counts(tmp_path):
    benchmark, results = fake_run()
    config = EvalConfig(model="m", baseline="smollm2", out=str(tmp_path), bootstrap_samples=200)
    report, predictions, flagged = build_report(benchmark, results, config)
    model, baseline = report["arms"]["model"], report["arms"]["baseline"]
    assert ARM_KEYS <= set(model) and ARM_KEYS <= set(baseline)
    assert model["n_scored"] == baseline["n_scored"] == 5
    assert model["n_flagged"] == report["benchmark"]["n_flagged"] == 2
    assert report["benchmark"]["flagged_reasons"] == {"answer_not_in_options": 1, "bad_sequence": 1}
    assert model["accuracy"] == 1.0 and baseline["accuracy"] == 0.2
    assert baseline["n_unparseable"] == 1
    assert baseline["predicted_distribution"] == {"1": 1, "2": 2, "3": 1, "unparseable": 1}
    assert report["benchmark"]["chance"] == (3 * 0.25 + 2 * 0.5) / 5
    # Discordant: model alone right on 4 items, baseline alone on none → p = 2 / 16.
    assert report["mcnemar"]["only_model_correct"] == 4 and report["mcnemar"]["only_baseline_correct"] == 0
    assert report["mcnemar_p"] == model["mcnemar_p"] == 0.125
    assert len(predictions) == 10 and {p["arm"] for p in predictions} == {"model", "baseline"}
    assert [f["item_id"] for f in flagged] == ["b[9]", "b[5]"]


def test_report_files(tmp_path):
    benchmark, results = fake_run()
    config = EvalConfig(model="m", baseline="smollm2", out=str(tmp_path), bootstrap_samples=200)
    report, predictions, flagged = build_report(benchmark, results, config)
    paths = write_report(report, predictions, flagged, tmp_path / "out")
    written = json.loads(paths["report.json"].read_text())
    assert written == json.loads(json.dumps(report))
    assert paths["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["report.md"].read_text()
    assert "| model | `m` | 100.0% |" in markdown and "McNemar" in markdown and "| unparseable | 0 | 0 | 1 |" in markdown
    assert len(paths["predictions.jsonl"].read_text().splitlines()) == 10
    assert len(paths["flagged.jsonl"].read_text().splitlines()) == 2


def test_single_arm_has_no_mcnemar(tmp_path):
    benchmark, results = fake_run()
    config = EvalConfig(model="m", baseline=None, out=str(tmp_path))
    report, _, _ = build_report(benchmark, results[1:], config)
    assert "mcnemar_p" not in report and "mcnemar_p" not in report["arms"]["baseline"]
    assert report["arms"]["baseline"]["n_scored"] == 6


def test_nothing_scorable_still_writes_a_report(tmp_path):
    benchmark = Benchmark("proteinlmbench", "bench.json", [], [FlaggedItem("b[0]", "missing_field", "x")])
    results = [ArmResult("model", "m", True), ArmResult("baseline", "b", False)]
    report, predictions, flagged = build_report(benchmark, results, EvalConfig(model="m", baseline="b", out=str(tmp_path)))
    paths = write_report(report, predictions, flagged, tmp_path)
    assert report["arms"]["model"]["accuracy"] is None and report["arms"]["model"]["n_flagged"] == 1
    assert report["mcnemar_p"] == 1.0 and report["benchmark"]["chance"] is None
    assert "n/a" in paths["report.md"].read_text()
