"""lm-evaluation-harness against `protein-llava serve`, next to eval.py, on the same items.

    python bench/lm_eval_agreement.py --model checkpoints/smollm2-demo-stage2/export [--limit N] [eval.py overrides]

1. eval.py in `loglik` mode scores the items (the benchmark eval.py defaults to, unless overridden).
2. The same items, with the prompt text eval.py scored, become an lm-eval task (`write_lm_eval_task`).
3. `protein-llava serve` serves the model on 127.0.0.1; lm-eval's `local-completions` scores the task over
   HTTP, token ids sent as lm-eval tokenizes them, proteins inline as `<seq> … </seq>`.
4. Prints both accuracies, how many items get the same prediction, and the lm-eval command it ran.
5. On text-only items, lm-eval's own `hf` backend scores the same task on the export's decoder (saved as a
   plain transformers folder): every option log-likelihood and prediction must equal the served run's.
   `prompt_format=chat` puts each item in an assistant turn that ends after the option number, so the model's
   next token is often its end of turn: the case where a reply that drops a generated stop token goes wrong.
   Writes `<out>/agreement.json`.

eval.py's loglik score is the label term lm-eval computes, plus log P(no further digit) (see
`evaluation/scoring.py`), so the two can differ on an item where that term decides.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TASK = "protein_llava_agreement"
SERVED_NAME = "protein-llava"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], **options) -> None:
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, **options)


def eval_overrides(args) -> list[str]:
    limit = [f"limit={args.limit}"] if args.limit else []
    return [f"model={args.model}", "baseline=null", "mode=loglik", "ablation=none", f"out={args.out}/eval", *limit, *args.overrides]


def prompts_of(args):
    """The items eval.py scored and the exact text it scored for each (eval.py's own functions)."""
    from omegaconf import OmegaConf

    from protein_llava.evaluation import EvalConfig, load_benchmark
    from protein_llava.evaluation.arms import load_arm
    from protein_llava.evaluation.config import compose_eval_config
    from protein_llava.evaluation.runner import item_prompt

    cfg = compose_eval_config(eval_overrides(args))
    config = EvalConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    items = load_benchmark(config.benchmark, config.limit).items
    arm = load_arm("model", config.model, config.dtype, "cpu", config.attn_implementation)
    texts = [item_prompt(arm, item, config) for item in items]
    adds_special = config.prompt_format == "raw"
    tokenizer = arm.tokenizer
    probe = "probe"
    # eval.py lets a raw prompt take the tokenizer's special tokens; lm-eval must do the same.
    add_bos = adds_special and tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]
    return items, texts, add_bos


def wait_for(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server at {url} did not come up within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported ProteinLLM folder")
    parser.add_argument("--limit", type=int, default=None, help="first N items (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "lm-eval-agreement")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval requests per HTTP call")
    parser.add_argument("overrides", nargs="*", help="more eval.py overrides, e.g. benchmark=proteinlmbench benchmark.path=FILE")
    args = parser.parse_args()
    args.model = str(Path(args.model).resolve())
    args.out = args.out.resolve()
    from protein_llava.evaluation.lm_eval_task import write_lm_eval_task

    started = time.monotonic()
    run([sys.executable, "eval.py", *eval_overrides(args)])
    eval_seconds = time.monotonic() - started
    predictions = {}
    for line in (args.out / "eval" / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["arm"] == "model":  # the file also holds the retrieval and probe arms' rows
            predictions[row["item_id"]] = row

    items, texts, add_bos = prompts_of(args)
    task_folder = write_lm_eval_task(items, texts, args.out / "task", TASK)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_command = [
        sys.executable, "-m", "protein_llava.cli", "serve", "--model", args.model, "--port", str(port),
        "--served-model-name", SERVED_NAME, "--max-wait-ms", "5", "--log-level", "warning", "--device", "cpu",
    ]
    print("$ " + shlex.join(server_command), flush=True)
    server = subprocess.Popen(server_command, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        wait_for(url, server)
        model_args = (
            f"model={SERVED_NAME},base_url={url}/v1/completions,tokenizer={args.model},tokenized_requests=True,"
            f"add_bos_token={add_bos},num_concurrent=1,max_retries=1"
        )
        started = time.monotonic()
        run(
            [
                sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
                "--tasks", TASK, "--include_path", str(task_folder), "--batch_size", str(args.batch_size),
                "--output_path", str(args.out / "lm-eval"), "--log_samples",
            ]
        )
        lm_eval_seconds = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=60)

    samples = latest_samples(args.out / "lm-eval")
    scored = [item for item in items if item.item_id in predictions and item.item_id in samples]
    eval_correct = sum(bool(predictions[i.item_id]["correct"]) for i in scored)
    lm_correct = sum(samples[i.item_id]["acc"] == 1.0 for i in scored)
    same = sum(predictions[i.item_id]["predicted"] == samples[i.item_id]["predicted"] for i in scored)
    summary = {
        "items": len(scored),
        "eval_py_accuracy": eval_correct / len(scored),
        "lm_eval_accuracy": lm_correct / len(scored),
        "same_prediction": same,
        "eval_py_seconds": round(eval_seconds, 1),
        "lm_eval_seconds": round(lm_eval_seconds, 1),
        "model": args.model,
        "eval_overrides": eval_overrides(args),
    }
    print(
        f"\n{len(scored)} items: eval.py loglik {100 * summary['eval_py_accuracy']:.1f}% ({eval_correct}), "
        f"lm-eval local-completions {100 * summary['lm_eval_accuracy']:.1f}% ({lm_correct}); "
        f"same prediction on {same}/{len(scored)}; eval.py {eval_seconds:.0f} s, lm-eval over HTTP {lm_eval_seconds:.0f} s"
    )
    if any(item.proteins for item in items):
        print("lm-eval `hf` not run: these items carry proteins, which a plain decoder cannot read")
    else:
        summary["hf"] = compare_with_hf(args, task_folder, add_bos, samples, items)
    (args.out / "agreement.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def latest_samples(folder: Path) -> dict:
    from protein_llava.evaluation.lm_eval_task import read_lm_eval_samples

    return read_lm_eval_samples(max(folder.rglob(f"samples_{TASK}_*.jsonl"), key=lambda p: p.stat().st_mtime))


def compare_with_hf(args, task_folder: Path, add_bos: bool, served: dict, items) -> dict:
    """lm-eval's own `hf` backend on the export's decoder, saved as a plain transformers folder: the same
    task, tokenizer and BOS setting as the run through the server, so every option log-likelihood and
    every prediction must agree."""
    from protein_llava.loading import load_protein_llm

    decoder = args.out / "decoder"
    loaded = load_protein_llm(args.model, device="cpu", dtype="float32")
    loaded.model.language_model.save_pretrained(decoder)
    loaded.processor.tokenizer.save_pretrained(decoder)
    del loaded
    started = time.monotonic()
    run(
        [
            sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={decoder},dtype=float32,add_bos_token={add_bos}", "--device", "cpu",
            "--tasks", TASK, "--include_path", str(task_folder), "--batch_size", str(args.batch_size),
            "--output_path", str(args.out / "lm-eval-hf"), "--log_samples",
        ]
    )
    seconds = time.monotonic() - started
    local = latest_samples(args.out / "lm-eval-hf")
    both = [item.item_id for item in items if item.item_id in served and item.item_id in local]
    largest = max(
        (abs(a - b) for item_id in both for a, b in zip(served[item_id]["logliks"], local[item_id]["logliks"])), default=0.0
    )
    same = sum(served[item_id]["predicted"] == local[item_id]["predicted"] for item_id in both)
    hf_correct = sum(local[item_id]["acc"] == 1.0 for item_id in both)
    print(
        f"lm-eval hf on the same decoder: {100 * hf_correct / len(both):.1f}% ({hf_correct}/{len(both)}); same prediction as "
        f"local-completions on {same}/{len(both)}; largest option log-likelihood difference {largest:.2e} nats; hf {seconds:.0f} s"
    )
    return {"items": len(both), "accuracy": hf_correct / len(both), "same_prediction": same, "max_abs_loglik_diff": largest, "seconds": round(seconds, 1)}


if __name__ == "__main__":
    sys.exit(main())
