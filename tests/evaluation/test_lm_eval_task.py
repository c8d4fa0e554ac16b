"""lm-evaluation-harness's `local-completions` scores a live `protein-llava serve` on benchmark items with
inline proteins: its option log-likelihoods equal a direct forward of the model, and so does its accuracy. On
text-only items they equal lm-eval's own `hf` backend on the same weights, also where the model's next token
after an option is a stop token (the server must still return that generated token)."""

import copy
import dataclasses
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
from protein_llava.loading import LoadedModel, load_protein_llm
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


def direct_loglik(loaded, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt) by one forward of the model, tokenized the way lm-eval does."""
    processor = loaded.processor
    whole = processor(text=prompt + continuation, add_special_tokens=False)
    context = processor(text=prompt, add_special_tokens=False)["input_ids"].shape[1]
    with torch.inference_mode():
        logits = loaded.model(**whole).logits[0].float().log_softmax(-1)
    ids = whole["input_ids"][0]
    return sum(float(logits[i - 1, ids[i]]) for i in range(context, ids.shape[0]))


def test_lm_eval_local_completions_matches_a_direct_forward(tiny_folder, tmp_path, one_thread):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    loaded = load_protein_llm(tiny_folder, device="cpu")
    benchmark = items()
    prompts = [official_prompt(item.question, item.options) for item in benchmark]
    folder = write_lm_eval_task(benchmark, prompts, tmp_path / "task", "protein_llava_test")
    limits = ServerLimits(**{**TEST_LIMITS.__dict__, "max_body_bytes": 1 << 20, "max_wait_ms": 5})
    with live_server(create_app(loaded, limits, model_name=MODEL_NAME)) as url:
        model_args = (
            f"model={MODEL_NAME},base_url={url}/v1/completions,tokenizer={tiny_folder},"
            "tokenized_requests=True,num_concurrent=1,max_retries=1"
        )
        results = simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=["protein_llava_test"],
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            log_samples=True,
            batch_size=4,
        )
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text("\n".join(json.dumps(sample, default=str) for sample in results["samples"]["protein_llava_test"]))
    samples = read_lm_eval_samples(samples_file)
    assert sorted(samples) == [item.item_id for item in benchmark]
    correct = 0
    for item, prompt in zip(benchmark, prompts):
        expected = [direct_loglik(loaded, prompt, f" {n}") for n in range(1, 5)]
        assert samples[item.item_id]["logliks"] == pytest.approx(expected, abs=1e-4)
        correct += max(range(4), key=lambda j: expected[j]) + 1 == item.answer
    assert results["results"]["protein_llava_test"]["acc,none"] == pytest.approx(correct / len(benchmark))


# --- lm-eval through the server against lm-eval's own `hf` backend on the same weights


def save_plain_decoder(loaded, folder):
    """The ProteinLLM's decoder and tokenizer as a plain transformers folder, for lm-eval's `hf` backend."""
    loaded.model.language_model.save_pretrained(folder)
    loaded.processor.tokenizer.save_pretrained(folder)
    return folder


def lm_eval_both_ways(loaded, decoder_folder, benchmark, prompts, task_folder, task) -> tuple[dict, dict]:
    """Per item id, lm-eval's logliks and prediction: `local-completions` against a live server of
    `loaded`, and `hf` on `decoder_folder`; the same task, tokenizer and BOS setting."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    write_lm_eval_task(benchmark, prompts, task_folder, task)
    task_manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    limits = ServerLimits(**{**TEST_LIMITS.__dict__, "max_body_bytes": 1 << 22, "max_prompt_tokens": 4096, "max_wait_ms": 5})

    def samples_of(results) -> dict:
        file = task_folder / f"samples-{len(list(task_folder.glob('samples-*')))}.jsonl"
        file.write_text("\n".join(json.dumps(sample, default=str) for sample in results["samples"][task]))
        return read_lm_eval_samples(file)

    with live_server(create_app(loaded, limits, model_name=MODEL_NAME)) as url:
        served = simple_evaluate(
            model="local-completions",
            model_args=(
                f"model={MODEL_NAME},base_url={url}/v1/completions,tokenizer={decoder_folder},"
                "tokenized_requests=True,add_bos_token=False,num_concurrent=1,max_retries=1"
            ),
            tasks=[task],
            task_manager=task_manager,
            log_samples=True,
            batch_size=8,
        )
    local = simple_evaluate(
        model="hf",
        model_args=f"pretrained={decoder_folder},dtype=float32,device=cpu,add_bos_token=False",
        tasks=[task],
        task_manager=task_manager,
        log_samples=True,
        batch_size=8,
    )
    return samples_of(served), samples_of(local)


def assert_same_scores(served: dict, local: dict, benchmark) -> None:
    assert sorted(served) == sorted(local) == sorted(item.item_id for item in benchmark)
    for item in benchmark:
        assert served[item.item_id]["logliks"] == pytest.approx(local[item.item_id]["logliks"], abs=1e-4), item.item_id
        assert served[item.item_id]["predicted"] == local[item.item_id]["predicted"], item.item_id


def next_tokens(loaded, prompt: str, options: int) -> list[int]:
    """The greedy token after prompt + " n" for each option n, tokenized as lm-eval sends it. The options'
    common token prefix runs once; each option's own tokens run on a copy of its cache."""
    tokenizer = loaded.processor.tokenizer
    rows = [tokenizer(prompt + f" {number}", add_special_tokens=False)["input_ids"] for number in range(1, options + 1)]
    shared = min(len(row) for row in rows) - 1
    shared = next((i for i in range(shared) if len({row[i] for row in rows}) > 1), shared)
    result = []
    with torch.inference_mode():
        prefix = loaded.model(input_ids=torch.tensor([rows[0][:shared]]), use_cache=True).cache
        for row in rows:
            own = loaded.model(input_ids=torch.tensor([row[shared:]]), cache=copy.deepcopy(prefix), use_cache=True)
            result.append(int(own.logits[0, -1].argmax()))
    return result


def text_items(count: int) -> list[BenchmarkItem]:
    return [
        BenchmarkItem(
            f"text{index}",
            f"Which residue is most common in a protein rich in {'AKDE'[index % 4]}?",
            tuple(f"residue {chr(65 + n + index)}" for n in range(index % 3 + 3)),
            answer=1 + index % 3,
        )
        for index in range(count)
    ]


def test_lm_eval_through_the_server_equals_lm_eval_hf_when_the_next_token_is_a_stop(tiny_folder, tmp_path, one_thread):
    """The tiny model stops at every token it would generate after an option ("end of turn" everywhere):
    the server's reply still holds that generated token, so lm-eval's `[:-1]` cuts only it."""
    loaded = load_protein_llm(tiny_folder, device="cpu")
    benchmark = text_items(6)
    prompts = [official_prompt(item.question, item.options) for item in benchmark]
    stops = sorted({token for item, prompt in zip(benchmark, prompts) for token in next_tokens(loaded, prompt, item.num_options)})
    loaded.stop_token_ids = stops
    decoder = save_plain_decoder(loaded, tmp_path / "decoder")
    served, local = lm_eval_both_ways(loaded, decoder, benchmark, prompts, tmp_path / "task", "tiny_agreement")
    assert_same_scores(served, local, benchmark)


def test_lm_eval_through_the_server_equals_lm_eval_hf_on_smollm2_proteinlmbench(smollm2, shared_data, tmp_path):
    """SmolLM2-135M-Instruct on ProteinLMBench items of the shared sample, each as the raw official prompt
    and as a chat turn the model ends after the option number (its greedy next token is <|im_end|>)."""
    from protein_llava.evaluation.benchmarks import load_proteinlmbench

    _, model, processor = smollm2
    loaded = LoadedModel(model.eval(), processor.tokenizer, processor, device="cpu")
    # The two shortest of the first ten items keep this to two forwards of ~250 tokens per option and backend.
    first = load_proteinlmbench(str(shared_data / "proteinlmbench_sample.json"), limit=10).items
    benchmark = sorted(first, key=lambda item: len(official_prompt(item.question, item.options)))[:2]
    raw = [official_prompt(item.question, item.options) for item in benchmark]
    chat = [
        loaded.render_chat([{"role": "user", "content": prompt + "\nReply with the option number only."}]) + "The correct option is:"
        for prompt in raw
    ]
    items = [*benchmark, *(dataclasses.replace(item, item_id=f"{item.item_id}-chat") for item in benchmark)]
    prompts = [*raw, *chat]
    assert not any("<seq>" in prompt for prompt in prompts)  # text only: lm-eval's `hf` cannot read proteins
    ends_turn = sum(
        token in loaded.stop_token_ids for item, prompt in zip(benchmark, chat) for token in next_tokens(loaded, prompt, item.num_options)
    )
    assert ends_turn >= 2, "the chat prompts must make the model end its turn after some options"
    decoder = save_plain_decoder(loaded, tmp_path / "decoder")
    served, local = lm_eval_both_ways(loaded, decoder, items, prompts, tmp_path / "task", "smollm2_agreement")
    assert_same_scores(served, local, items)
