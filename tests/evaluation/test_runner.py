"""Tests for protein_llava.evaluation.runner: whole runs on tiny saved models, permutation averaging,
generation, chat prompts, and items one arm cannot read."""

from __future__ import annotations

import json
import re

import pytest

from protein_llava.builders import build_tiny
from protein_llava.evaluation import runner
from protein_llava.loading import LoadedModel
from protein_llava.evaluation.benchmarks import ANSWER_ANCHOR, BenchmarkItem, official_prompt
from protein_llava.evaluation.config import BenchmarkConfig, EvalConfig
from protein_llava.evaluation.runner import evaluate_arm, item_prompt, run_evaluation
from protein_llava.sequences import format_sequence


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny):
    """A saved ProteinLLM (the model) and its decoder + tokenizer as a plain causal LM (the baseline)."""
    model, processor = tiny
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "multimodal")
    processor.save_pretrained(root / "multimodal")
    model.language_model.save_pretrained(root / "text")
    processor.tokenizer.save_pretrained(root / "text")
    return {"model": str(root / "multimodal"), "baseline": str(root / "text")}


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    """Four ProteinLMBench-style items, one with a protein too long for the encoder, and one bad entry."""
    items = [
        {"question": f"Question {i}?", "options": [f"option {n}: text {n}" for n in range(1, 3 + i % 2)], "answer": "option 1"}
        for i in range(4)
    ]
    items.append({"question": f"Long {format_sequence('A' * 1100)}?", "options": ["option 1: a", "option 2: b"], "answer": "option 2"})
    items.append({"question": "Broken", "options": ["option 1: a", "option 2: b"], "answer": "option 3"})
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    path.write_text(json.dumps(items))
    return str(path)


def config(folders, bench_file, out, **overrides) -> EvalConfig:
    values = dict(
        model=folders["model"], baseline=folders["baseline"], out=str(out), progress=False, bootstrap_samples=200, batch_size=2,
        benchmark=BenchmarkConfig(name="proteinlmbench", path=bench_file),
    )
    return EvalConfig(**{**values, **overrides})


def test_run_pairs_arms_and_flags_unreadable_items(folders, bench_file, tmp_path):
    report = run_evaluation(config(folders, bench_file, tmp_path, permutations=True))
    assert report["benchmark"]["flagged_reasons"] == {"answer_not_in_options": 1, "too_long_protein": 1}
    for arm in report["arms"].values():
        assert arm["n_scored"] == 4 and arm["n_flagged"] == 2 and arm["n_unparseable"] == 0
        assert 0.0 <= arm["accuracy"] <= 1.0 and arm["ci95"][0] <= arm["accuracy"] <= arm["ci95"][1]
    assert report["arms"]["model"]["multimodal"] and not report["arms"]["baseline"]["multimodal"]
    assert 0.0 <= report["mcnemar_p"] <= 1.0
    assert 0.0 <= report["arms"]["model"]["accuracy_permuted"] <= 1.0
    assert {"report.json", "report.md", "report.png", "predictions.jsonl", "flagged.jsonl"} <= {p.name for p in tmp_path.iterdir()}


def test_same_run_twice_gives_the_same_report(folders, bench_file, tmp_path):
    first = run_evaluation(config(folders, bench_file, tmp_path))
    first_predictions = (tmp_path / "predictions.jsonl").read_text()
    second = run_evaluation(config(folders, bench_file, tmp_path))
    assert first == second
    assert (tmp_path / "predictions.jsonl").read_text() == first_predictions


def test_permutation_average_maps_back_to_original_options(tiny, monkeypatch):
    """A fake scorer that likes the option text "good" but likes position 1 more: the raw pick is
    position 1, the permutation-averaged pick is wherever "good" originally was."""

    def fake_score_options(arm, texts, num_options, **kwargs):
        scores = []
        for text in texts:
            options = re.findall(r"^option (\d+): (.*)$", text, flags=re.M)
            scores.append([(0.0 if body == "good" else -5.0) + (6.0 if n == "1" else 0.0) for n, body in options])
        return scores

    monkeypatch.setattr(runner, "score_options", fake_score_options)
    model, processor = tiny
    arm = LoadedModel(model, processor.tokenizer, processor, name="model", source="tiny")
    items = [BenchmarkItem(f"i{g}", "q", tuple(f"option {n}: {'good' if n == g else 'bad'}" for n in range(1, 5)), g) for g in (1, 3, 4)]
    result = evaluate_arm(arm, items, EvalConfig(model="x", baseline=None, permutations=True, progress=False))
    for item in items:
        prediction = result.predictions[item.item_id]
        assert prediction["predicted"] == 1
        assert prediction["predicted_permuted"] == item.answer and prediction["correct_permuted"]
        assert sum(prediction["probabilities_permuted"]) == pytest.approx(1.0)


def test_generate_mode_counts_unparseable(folders, bench_file, tmp_path):
    report = run_evaluation(config(folders, bench_file, tmp_path, mode="generate", max_new_tokens=3, baseline=None))
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    unparseable = [p for p in lines if not re.search(r"\d", p["output"])]
    assert report["arms"]["model"]["n_unparseable"] == len(unparseable)
    assert all(p["predicted"] is None and not p["correct"] for p in unparseable)
    assert "mcnemar_p" not in report


def test_chat_prompt_wraps_the_official_text(tiny):
    model, processor = tiny
    arm = LoadedModel(model, processor.tokenizer, processor, name="model", source="tiny")
    item = BenchmarkItem("i", "Which?", ("option 1: a", "option 2: b"), 1)
    official = official_prompt(item.question, item.options)
    chat = EvalConfig(model="x", baseline=None, prompt_format="chat")
    expected = f"<|im_start|>user\n{official}<|im_end|>\n<|im_start|>assistant\n"
    assert item_prompt(arm, item, chat) == expected + ANSWER_ANCHOR
    assert item_prompt(arm, item, EvalConfig(model="x", baseline=None, prompt_format="chat", mode="generate")) == expected
    assert item_prompt(arm, item, EvalConfig(model="x", baseline=None)) == official
    result = evaluate_arm(arm, [item], EvalConfig(model="x", baseline=None, prompt_format="chat", progress=False))
    assert result.predictions["i"]["predicted"] in (1, 2)


def test_missing_model_fails_before_loading(folders, bench_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="baseline folder /no/such/folder does not exist"):
        run_evaluation(config(folders, bench_file, tmp_path, baseline="/no/such/folder"))
    assert not (tmp_path / "report.json").exists()


def test_sequence_grounded_run_has_retrieval_probe_ablated_arms_and_question_types(folders, tmp_path):
    from protein_llava.data.demo import QUESTION_TYPES, write_demo_dataset

    paths = write_demo_dataset(tmp_path / "demo", num_train=40, num_heldout=12, seed=0)
    benchmark = BenchmarkConfig(
        name="sequence_grounded", path=str(paths["heldout"]), train_paths=[str(paths["train"])], retrieval=True, probe=True
    )
    report = run_evaluation(
        config(folders, "unused.json", tmp_path / "out", benchmark=benchmark, mode="description", ablation="shuffle", limit=24)
    )
    arms = report["arms"]
    assert list(arms) == [
        "model", "model_ablated", "baseline", "baseline_ablated", "retrieval", "retrieval_ablated", "probe", "probe_ablated",
    ]
    assert f"on {folders['model']}'s frozen encoder, layer 2 mean-pooled; 160 training records" in arms["probe"]["source"]
    n = report["benchmark"]["n_scored"]
    assert n + report["benchmark"]["n_flagged"] == 24
    for name, arm in arms.items():
        assert arm["n_scored"] == n, name
        by_type = arm["by_category"]
        assert set(by_type) <= set(QUESTION_TYPES) and sum(v["n"] for v in by_type.values()) == n
        assert all(v["chance"] == 0.25 for v in by_type.values())
    # McNemar pairs the model with the baseline, not with the ablated or retrieval arms.
    assert report["mcnemar"]["arms"] == ["model", "baseline"]
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    retrieval = [p for p in predictions if p["arm"] == "retrieval"]
    assert len(retrieval) == n and all(0.0 <= p["max_identity"] <= 1.0 for p in retrieval)
    probe = [p for p in predictions if p["arm"] == "probe_ablated"]
    assert len(probe) == n and all(len(p["scores"]) == p["num_options"] for p in probe)
    report_md = (tmp_path / "out" / "report.md").read_text()
    assert "## By question type" in report_md and "| probe_ablated |" in report_md


def test_probe_needs_a_multimodal_model_and_training_files(folders, tmp_path):
    from protein_llava.evaluation.runner import check_probe_model

    benchmark = BenchmarkConfig(name="sequence_grounded", path="held.jsonl", train_paths=["train.jsonl"], probe=True)
    text_only = config(folders, "unused.json", tmp_path, model=folders["baseline"], baseline=None, benchmark=benchmark)
    with pytest.raises(ValueError, match="probe=true .* is a text-only model"):
        run_evaluation(text_only)  # before the benchmark (whose files do not exist) is read
    check_probe_model(config(folders, "unused.json", tmp_path, benchmark=benchmark))  # a ProteinLLM folder passes
    with pytest.raises(ValueError, match="probe=true needs"):
        BenchmarkConfig(name="sequence_grounded", path="x.jsonl", probe=True)
    with pytest.raises(ValueError, match="probe=true needs"):
        BenchmarkConfig(name="proteinlmbench", path="x.json", train_paths=["t.jsonl"], probe=True)


def test_ablation_needs_items_with_proteins():
    with pytest.raises(ValueError, match="ablation=shuffle .* needs benchmark.name=sequence_grounded"):
        EvalConfig(benchmark=BenchmarkConfig(name="proteinlmbench", path="x.json"), ablation="shuffle")
    with pytest.raises(ValueError, match="retrieval=true needs"):
        BenchmarkConfig(name="sequence_grounded", path="x.jsonl", retrieval=True)
