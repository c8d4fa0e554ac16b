"""Real weights: SmolLM2-135M-Instruct (text only) on the 60-item ProteinLMBench sample, loglik scoring.

Reads ../shared/data (never copied into the project); skipped with the reason when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protein_llava.evaluation.arms import load_arm
from protein_llava.evaluation.benchmarks import load_proteinlmbench, official_prompt
from protein_llava.evaluation.config import EvalConfig
from protein_llava.evaluation.report import summarize_arm
from protein_llava.evaluation.runner import evaluate_arm
from protein_llava.evaluation.scoring import score_options, score_options_reference

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "proteinlmbench_sample.json"
pytestmark = pytest.mark.slow
CONFIG = EvalConfig(model="smollm2", baseline=None, progress=False)


@pytest.fixture(scope="session")
def benchmark():
    if not SAMPLE.is_file():
        pytest.skip(f"shared reference data not found: {SAMPLE.resolve()} (the sample is read in place, never copied)")
    return load_proteinlmbench(str(SAMPLE))


@pytest.fixture(scope="session")
def smollm2_arm():
    try:
        return load_arm("model", "smollm2")
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {error}")


# Session scope: `make test` runs pytest-xdist workers, which interleave modules; a module-scoped run would
# be torn down and built again when a test of its module comes back to a worker.
@pytest.fixture(scope="session")
def result(benchmark, smollm2_arm):
    return evaluate_arm(smollm2_arm, benchmark.items, CONFIG)


def test_all_sixty_items_scored(benchmark, result):
    predictions = [result.predictions[item.item_id] for item in benchmark.items]
    summary = summarize_arm(predictions, n_flagged=len(benchmark.flagged))
    chance = sum(1 / item.num_options for item in benchmark.items) / len(benchmark.items)
    print(f"\nSmolLM2-135M-Instruct, raw loglik, 60-item sample: accuracy {summary['accuracy']:.3f} "
          f"(95% CI {summary['ci95'][0]:.3f}-{summary['ci95'][1]:.3f}), chance {chance:.3f}, "
          f"predicted options {summary['predicted_distribution']}")
    assert summary["n_scored"] == 60 and summary["n_flagged"] == 0 and summary["n_unparseable"] == 0
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert sum(summary["predicted_distribution"].values()) == 60
    assert set(summary["predicted_distribution"]) <= {str(n) for n in range(1, 7)}
    for item, prediction in zip(benchmark.items, predictions):
        assert len(prediction["scores"]) == item.num_options
        assert sum(prediction["probabilities"]) == pytest.approx(1.0)


def test_rerun_gives_the_same_answers(benchmark, smollm2_arm, result):
    items = benchmark.items[:8]
    again = evaluate_arm(smollm2_arm, items, CONFIG)  # other batches than the full run: only float noise may differ
    for item in items:
        first, second = result.predictions[item.item_id], again.predictions[item.item_id]
        assert second["scores"] == pytest.approx(first["scores"], abs=1e-4)
        top_two = sorted(first["scores"])[-2:]
        if top_two[1] - top_two[0] > 1e-3:
            assert second["predicted"] == first["predicted"]


def test_fast_path_equals_reference_on_real_weights(benchmark, smollm2_arm):
    item = min(benchmark.items, key=lambda i: len(official_prompt(i.question, i.options)))
    text = official_prompt(item.question, item.options)
    fast = score_options(smollm2_arm, [text], [item.num_options])[0]
    assert fast == pytest.approx(score_options_reference(smollm2_arm, text, item.num_options), abs=1e-4)
