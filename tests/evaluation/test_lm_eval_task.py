"""lm-evaluation-harness's `local-completions` scores a live `protein-llava serve` on benchmark items with
inline proteins: its option log-likelihoods equal a direct forward of the model, and so does its accuracy."""

import json

import pytest
import torch
from live_server import MODEL_NAME, TEST_LIMITS, live_server
from sample_proteins import P1, P2

from protein_llava.evaluation.benchmarks import BenchmarkItem, official_prompt
from protein_llava.evaluation.lm_eval_task import (
    read_lm_eval_samples,
    write_lm_eval_task,
)
from protein_llava.inference.predict import Answerer
from protein_llava.sequences import format_sequence
from protein_llava.inference.serving import ServerLimits, create_app

pytestmark = pytest.mark.slow
PROTEINS = [P1.replace(" ", "")[:30], P2.replace(" ", "")[:30], "MKTAYIAKQRQISFVK", "MSIPSSQYGFVFNKQ"]


def items() -> list[BenchmarkItem]:
    return [
        BenchmarkItem(
            f"item{index}",
            f"Which family does {format_sequence(protein)} belong to?",
            tuple(f"option {n}: family {chr(64 + n)}" for n in range(1, 5)),
            answer=index % 4 + 1,
            proteins=(protein,),
        )
        for index, protein in enumerate(PROTEINS)
    ]


def direct_loglik(answerer, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt) by one forward of the model, tokenized the way lm-eval does."""
    processor = answerer.processor
    whole = processor(text=prompt + continuation, add_special_tokens=False)
    context = processor(text=prompt, add_special_tokens=False)["input_ids"].shape[1]
    with torch.inference_mode():
        logits = answerer.model(**whole).logits[0].float().log_softmax(-1)
    ids = whole["input_ids"][0]
    return sum(float(logits[i - 1, ids[i]]) for i in range(context, ids.shape[0]))


def test_lm_eval_local_completions_matches_a_direct_forward(tiny_folder, tmp_path, one_thread):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    answerer = Answerer.from_folder(tiny_folder, device="cpu")
    benchmark = items()
    prompts = [official_prompt(item.question, item.options) for item in benchmark]
    folder = write_lm_eval_task(benchmark, prompts, tmp_path / "task", "protein_llava_test")
    limits = ServerLimits(**{**TEST_LIMITS.__dict__, "max_body_bytes": 1 << 20, "max_wait_ms": 5})
    with live_server(create_app(answerer, limits, model_name=MODEL_NAME)) as url:
        model_args = (
            f"model={MODEL_NAME},base_url={url}/v1/completions,tokenizer={tiny_folder},"
            "tokenized_requests=True,num_concurrent=1,max_retries=1"
        )
        results = simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=["protein_llava_test"],
            task_manager=TaskManager(include_path=str(folder)),
            log_samples=True,
            batch_size=4,
        )
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text("\n".join(json.dumps(sample, default=str) for sample in results["samples"]["protein_llava_test"]))
    samples = read_lm_eval_samples(samples_file)
    assert sorted(samples) == [item.item_id for item in benchmark]
    correct = 0
    for item, prompt in zip(benchmark, prompts):
        expected = [direct_loglik(answerer, prompt, f" {n}") for n in range(1, 5)]
        assert samples[item.item_id]["logliks"] == pytest.approx(expected, abs=1e-4)
        correct += max(range(4), key=lambda j: expected[j]) + 1 == item.answer
    assert results["results"]["protein_llava_test"]["acc,none"] == pytest.approx(correct / len(benchmark))
