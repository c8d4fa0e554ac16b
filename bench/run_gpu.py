"""GPU benchmark: the 7B-shaped model (ESM-2 650M + InternLM2-7B shapes), random-init bf16 weights.

    python bench/run_gpu.py [--out bench/results-gpu.json] [--peak-tflops 989] [--pack-length 4096]

Figures (each measured in this one run): stage-2 LoRA tokens/s and LoRA-MFU with flash_attention_2 and
with sdpa (their ratio), peak memory, stage-1 tokens/s, and seconds to score 944 ProteinLMBench-shaped items.
LoRA-MFU = tokens/s * (4 * N_frozen + 6 * N_trainable) / peak, with the peak given explicitly (989 TFLOP/s
dense bf16 for an H100 SXM). Speed does not depend on weight values, so no download is needed.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(attn_implementation: str):
    from transformers import AutoModelForCausalLM

    from protein_llava.builders import build_protein_llm
    from protein_llava.model.configuration import ProteinLLMConfig
    from protein_llava.text_tokenizer import byte_level_tokenizer

    config = ProteinLLMConfig.from_preset("esm2-650m-internlm2-7b")
    config.text_config._attn_implementation = attn_implementation
    with torch.device("cuda"):
        decoder = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.bfloat16)
        model, processor = build_protein_llm(config, byte_level_tokenizer(), decoder)
    return model.to(device="cuda", dtype=torch.bfloat16), processor


def packed_batch(pack_length: int, num_proteins: int, protein_length: int, vocab: int, protein_token_id: int):
    """One packed row: samples of ~512 tokens, each with one protein of `protein_length` residues."""
    sample = 512
    ids, positions, labels = [], [], []
    proteins = 0
    while len(ids) + sample <= pack_length:
        text = torch.randint(10, vocab, (sample,))
        if proteins < num_proteins:
            text[8 : 8 + protein_length] = protein_token_id
            proteins += 1
        ids.append(text)
        positions.append(torch.arange(sample))
        label = text.clone()
        label[: sample // 2] = -100
        labels.append(label)
    batch = {
        "input_ids": torch.cat(ids)[None],
        "position_ids": torch.cat(positions)[None],
        "labels": torch.cat(labels)[None].masked_fill(torch.cat(ids)[None] == protein_token_id, -100),
    }
    esm = torch.randint(4, 24, (proteins, protein_length + 2))
    esm[:, 0], esm[:, -1] = 0, 2  # <cls> ... <eos>
    batch["protein_input_ids"] = esm
    return {k: v.cuda() for k, v in batch.items()}


def timed_steps(model, batch, steps: int, params) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for _ in range(2):  # warm-up (kernel selection, allocator)
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def stage2_lora(attn: str, args) -> dict:
    from protein_llava.training.stage import LoraSettings, apply_stage_spec, stage2_spec

    model, processor = build(attn)
    model = apply_stage_spec(model, stage2_spec("lora"), LoraSettings(dropout=0.05))
    model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.language_model.enable_input_require_grads()
    model.train()
    batch = packed_batch(args.pack_length, 4, 400, 90000, processor.protein_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    torch.cuda.reset_peak_memory_stats()
    seconds = timed_steps(model, batch, args.steps, trainable)
    tokens = batch["input_ids"].numel()
    tokens_per_s = tokens / seconds
    mfu = tokens_per_s * (4 * n_frozen + 6 * n_trainable) / (args.peak_tflops * 1e12)
    result = {
        "tokens_per_s": tokens_per_s,
        "lora_mfu": mfu,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "n_frozen": n_frozen,
        "n_trainable": n_trainable,
    }
    del model
    torch.cuda.empty_cache()
    return result


def stage1(args) -> dict:
    model, processor = build("sdpa")
    model.set_trainable(encoder=False, projector=True, llm=False)
    model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = packed_batch(args.pack_length, 8, 400, 90000, processor.protein_token_id)
    seconds = timed_steps(model, batch, args.steps, list(model.projector.parameters()))
    del model
    torch.cuda.empty_cache()
    return {"stage1_tokens_per_s": batch["input_ids"].numel() / seconds}


def eval_944(args) -> dict:
    from protein_llava.evaluation import official_prompt, score_options
    from protein_llava.loading import LoadedModel

    model, processor = build("sdpa")
    model.eval()
    arm = LoadedModel(model, processor.tokenizer, processor, name="bench", source="random-init")
    texts = [official_prompt(f"Question {i}: " + "which statement about this protein is right? " * 6, [f"option {n}: a statement" for n in range(1, 7)]) for i in range(944)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    score_options(arm, texts, [6] * 944, batch_size=32)
    torch.cuda.synchronize()
    return {"proteinlmbench_944_items_s": time.perf_counter() - start}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-gpu.json"))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--pack-length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/run_gpu.py needs a CUDA GPU")
    from transformers.utils import is_flash_attn_2_available

    results: dict = {"gpu": torch.cuda.get_device_name(), "date": date.today().isoformat(), "command": "python bench/run_gpu.py"}
    sdpa = stage2_lora("sdpa", args)
    results.update({f"stage2_sdpa_{k}": v for k, v in sdpa.items()})
    if is_flash_attn_2_available():
        flash = stage2_lora("flash_attention_2", args)
        results.update({f"stage2_flash_{k}": v for k, v in flash.items()})
        results["flash_vs_sdpa_speedup"] = flash["tokens_per_s"] / sdpa["tokens_per_s"]
    else:
        results["flash_attention_2"] = "not installed: pip install flash-attn --no-build-isolation"
    results.update(stage1(args))
    results.update(eval_944(args))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
