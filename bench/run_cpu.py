"""CPU benchmark suite: each figure is a ratio of two timings measured in this one run, on this machine.

    python bench/run_cpu.py [--out bench/results.json] [--only stage1-cache ...]

Writes `wrapper_overhead`, `packed_real_token_fraction`, `packed_vs_padded_speedup`,
`stage1_cache_encoder_share_removed` (with `stage1_cache_speedup` as information),
`loglik_vs_per_option_speedup`, `qlora_over_lora_step_time`, `bf16_autocast_speedup`,
`lora_dropout_slowdown` and `data_samples_per_s` (plus the raw timings behind them). Models are
random-init at the real shapes (SmolLM2-135M decoder, ESM-2 8M encoder): speed does not depend on the values
of the weights, and no download is needed. Timings alternate A/B and report medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from protein_llava.builders import build_protein_llm
from protein_llava.model.configuration import ProteinLLMConfig
from protein_llava.data.collate import PackedCollator, PaddedCollator
from protein_llava.data.demo import write_demo_dataset
from protein_llava.data.records import read_conversations
from protein_llava.data.tokenize import ConversationTokenizer, Example
from protein_llava.training.encoder_cache import RepresentationCache
from protein_llava.text_tokenizer import byte_level_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def demo_model():
    """smollm2-demo shapes, random weights, with the byte-level tokenizer (vocabulary size as SmolLM2's)."""
    torch.manual_seed(0)
    # One token per residue, no summary token, no output norm: the shape bench/README's figures were measured
    # on (the preset's projector pools 2 residues per token since issue #20; the kernels timed here are the same).
    config = ProteinLLMConfig.from_preset("smollm2-demo").with_projector(token_reduction="none", summary_token=False, output_norm="none")
    decoder = AutoModelForCausalLM.from_config(config.text_config)
    model, processor = build_protein_llm(config, byte_level_tokenizer(), decoder)
    return model, processor


def alternate(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of a() and b(), run alternately after one warm-up each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        a()
        times_a.append(time.perf_counter() - start)
        start = time.perf_counter()
        b()
        times_b.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def train_step(module: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        module(**batch, use_cache=False).loss.backward()
        optimizer.step()

    return step


def bench_wrapper_overhead(model, processor, repeats: int) -> dict:
    """A full train step of ProteinLLM on a text-only batch vs the same step of its bare decoder."""
    torch.manual_seed(0)
    ids = torch.randint(10, 250, (2, 192))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    model.set_trainable(encoder=False, projector=True, llm=True)
    params = [p for p in model.language_model.parameters() if p.requires_grad]
    wrapped = train_step(model, batch, torch.optim.SGD(params, lr=0.0))
    bare = train_step(model.language_model, batch, torch.optim.SGD(params, lr=0.0))
    t_wrapped, t_bare = alternate(wrapped, bare, repeats)
    return {"wrapper_overhead": t_wrapped / t_bare, "wrapper_step_s": t_wrapped, "bare_step_s": t_bare}


def proteinlmdataset_like_examples(count: int, seed: int = 0, scale: float = 1.0) -> list[Example]:
    """Token lengths drawn like ProteinLMDataset SFT records: long-tailed, median ~330 tokens, a few ~1500
    (`scale` shrinks them all for a CPU-sized run; the shape of the mix is what packing sees)."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        length = int(scale * min(1536, max(48, rng.lognormvariate(5.8, 0.55))))
        prompt = int(length * 0.7)
        ids = tuple(rng.randrange(10, 250) for _ in range(length))
        labels = (-100,) * prompt + ids[prompt:]
        examples.append(Example(ids, labels, (), f"synthetic-{i}"))
    return examples


def bench_packing(model, repeats: int, pack_length: int = 1024) -> dict:
    """Real tokens per second of a forward+backward: packed rows vs padded batches of the same examples.

    CPU-sized: 16 examples, lengths scaled by 0.35, pack_length 1024 (the GPU script uses the full mix and 4096)."""
    from protein_llava.data.batching import first_fit_packs

    examples = proteinlmdataset_like_examples(16, scale=0.35)
    lengths = [len(e.input_ids) for e in examples]
    packs = first_fit_packs(range(len(examples)), lengths, pack_length)
    packed_batches = [PackedCollator(3, pack_length)([[examples[i] for i in pack]]) for pack in packs]
    # The padded path batches in data order (random lengths), as a plain shuffled loader does.
    per_batch = max(1, round(len(examples) / len(packs)))
    padded_batches = [PaddedCollator(3)(examples[i : i + per_batch]) for i in range(0, len(examples), per_batch)]
    real = sum(lengths)
    packed_slots = sum(b["input_ids"].numel() for b in packed_batches)
    padded_slots = sum(b["input_ids"].numel() for b in padded_batches)
    decoder = model.language_model.train()
    decoder.requires_grad_(True)

    def run(batches):
        def go():
            for batch in batches:
                decoder(**batch, use_cache=False).loss.backward()
            decoder.zero_grad(set_to_none=True)

        return go

    t_packed, t_padded = alternate(run(packed_batches), run(padded_batches), 2)
    return {
        "packed_real_token_fraction": real / packed_slots,
        "padded_real_token_fraction": real / padded_slots,
        "packed_vs_padded_speedup": t_padded / t_packed,
        "packed_real_tokens_per_s": real / t_packed,
        "padded_real_tokens_per_s": real / t_padded,
        "pack_length": pack_length,
    }


def bench_stage1_cache(model, processor, data_path: Path, repeats: int, tmp: Path) -> dict:
    """A stage-1 step (projector trains, encoder and decoder frozen) reading cached vs online ESM-2 features."""
    tokenize = ConversationTokenizer(processor, 512, mode="caption")
    examples = [tokenize(c) for c in read_conversations(str(data_path), limit=4)]
    model.set_trainable(encoder=False, projector=True, llm=False)
    model.train()
    cache = RepresentationCache(tmp / "cache", model.protein_encoder)
    cache.add({p for e in examples for p in e.proteins})
    online_batch = PaddedCollator(3, processor)(examples)
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-4)

    def cached_step():
        # The cache read is part of the step: the collator pulls features from the memory-mapped shards.
        batch = PaddedCollator(3, processor, representation_cache=cache)(examples)
        train_step(model, batch, optimizer)()

    t_cached, t_online = alternate(cached_step, train_step(model, online_batch, optimizer), repeats)

    # What the cache replaces: the frozen encoder's forward over the batch's proteins, by a read of their
    # stored features. Timed directly (a difference of two whole steps would drown in the decoder's noise).
    proteins = [p for e in examples for p in e.proteins]

    @torch.no_grad()
    def encode():
        model.protein_encoder(online_batch["protein_input_ids"])

    t_read, t_encode = alternate(lambda: cache.batch(proteins), encode, 5 * repeats)
    return {
        "stage1_cache_encoder_share_removed": 1 - t_read / t_encode,
        "stage1_cache_read_s": t_read,
        "stage1_encoder_forward_s": t_encode,
        "stage1_cache_speedup": t_online / t_cached,
        "stage1_cached_step_s": t_cached,
        "stage1_online_step_s": t_online,
    }


def bench_qlora(repeats: int) -> dict:
    """A stage-2 train step (LoRA r=16 on every linear layer, AdamW) of the demo-shaped decoder in 4-bit NF4
    (QLoRA) vs the same decoder in float32 (LoRA), on the same batch, alternately."""
    from protein_llava.quantization import nf4_config, quantize_decoder
    from protein_llava.training.stage import LoraSettings, _wrap_lora

    torch.manual_seed(0)
    config = ProteinLLMConfig.from_preset("smollm2-demo").text_config
    full = AutoModelForCausalLM.from_config(config)
    four_bit = quantize_decoder(full, nf4_config())
    ids = torch.randint(10, 250, (4, 112))  # a demo stage-2 batch: 4 samples of ~110 tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = []
    for quantized, decoder in ((False, full), (True, four_bit)):
        model = _wrap_lora(decoder, LoraSettings(r=16, alpha=32, dropout=0.0), quantized=quantized).train()
        steps.append(train_step(model, batch, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)))
    t_lora, t_qlora = alternate(*steps, repeats)
    return {"qlora_over_lora_step_time": t_qlora / t_lora, "lora_step_s": t_lora, "qlora_step_s": t_qlora}


def bench_cpu_defaults(repeats: int) -> dict:
    """The CPU training defaults, each against its alternative on the same batch (the demo-shaped decoder,
    LoRA r=16 on every linear layer): bf16 autocast vs fp32, and LoRA dropout 0 vs 0.05."""
    from protein_llava.training.stage import LoraSettings, _wrap_lora

    torch.manual_seed(0)
    ids = torch.randint(10, 250, (4, 112))  # a demo stage-2 batch: 4 samples of ~110 tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    config = ProteinLLMConfig.from_preset("smollm2-demo").text_config
    models = {
        dropout: _wrap_lora(AutoModelForCausalLM.from_config(config), LoraSettings(dropout=dropout), quantized=False).train()
        for dropout in (0.0, 0.05)
    }

    def step(model, autocast: bool):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        plain = train_step(model, batch, optimizer)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                plain()

        return run

    t_bf16, t_fp32 = alternate(step(models[0.0], True), step(models[0.0], False), repeats)
    t_no_dropout, t_dropout = alternate(step(models[0.0], True), step(models[0.05], True), repeats)
    return {
        "bf16_autocast_speedup": t_fp32 / t_bf16,
        "fp32_step_s": t_fp32,
        "bf16_step_s": t_bf16,
        "lora_dropout_slowdown": t_dropout / t_no_dropout,
        "lora_dropout_0.05_step_s": t_dropout,
        "lora_dropout_0_step_s": t_no_dropout,
    }


def bench_loglik(model, processor, repeats: int) -> dict:
    """ProteinLMBench-style scoring: one prompt forward + one options forward vs one forward per option."""
    from protein_llava.evaluation import official_prompt, score_options, score_options_reference
    from protein_llava.loading import LoadedModel

    sample = ROOT.parent / "shared" / "data" / "proteinlmbench_sample.json"
    if sample.is_file():
        items = json.loads(sample.read_text())[:4]
        texts = [official_prompt(i["question"], i["options"]) for i in items]
        counts = [len(i["options"]) for i in items]
    else:  # the same shape without the shared data: ~260-token prompts, 6 options
        texts = [official_prompt(f"Question {i} about protein folding " * 8, [f"option {n}: answer text {n}" for n in range(1, 7)]) for i in range(4)]
        counts = [6] * 4
    model.eval()
    arm = LoadedModel(model, processor.tokenizer, processor, name="bench", source="random-init")
    fast = lambda: score_options(arm, texts, counts, batch_size=4)  # noqa: E731
    slow = lambda: [score_options_reference(arm, t, n) for t, n in zip(texts, counts)]  # noqa: E731
    t_fast, t_slow = alternate(fast, slow, 1)
    return {
        "loglik_vs_per_option_speedup": t_slow / t_fast,
        "loglik_s_per_item": t_fast / len(texts),
        "per_option_s_per_item": t_slow / len(texts),
        "mean_options": sum(counts) / len(counts),
    }


def bench_data_pipeline(processor, data_path: Path) -> dict:
    """Records → tokenized examples → padded batches on one core, samples per second."""
    torch.set_num_threads(1)
    conversations = read_conversations(str(data_path))
    tokenize = ConversationTokenizer(processor, 512)
    collate = PaddedCollator(3, processor)
    start = time.perf_counter()
    examples = [tokenize(c) for c in conversations]
    for i in range(0, len(examples), 8):
        collate(examples[i : i + 8])
    return {"data_samples_per_s": len(examples) / (time.perf_counter() - start)}


BENCHES = ("wrapper", "packing", "stage1-cache", "loglik", "qlora", "cpu-defaults", "data")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="+", choices=BENCHES, help="run these benches; their figures replace those in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    tmp = ROOT / "checkpoints" / "bench-tmp"
    data = write_demo_dataset(tmp / "demo", num_train=200, num_heldout=10, seed=0)["train"]
    model, processor = demo_model()
    out = Path(args.out)
    results: dict = json.loads(out.read_text()) if args.only and out.is_file() else {}
    benches = {
        "wrapper": lambda: bench_wrapper_overhead(model, processor, 3 * args.repeats),
        "packing": lambda: bench_packing(model, args.repeats),
        "stage1-cache": lambda: bench_stage1_cache(model, processor, data, args.repeats, tmp),
        "loglik": lambda: bench_loglik(model, processor, args.repeats),
        "qlora": lambda: bench_qlora(args.repeats),
        "cpu-defaults": lambda: bench_cpu_defaults(args.repeats),
        "data": lambda: bench_data_pipeline(processor, data),
    }
    for name, run in benches.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        figures = run()
        results.update(figures)
        print(f"{name:13s} {time.perf_counter() - start:6.1f}s  " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": threads,
        "data_pipeline_threads": 1,
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "command": "python bench/run_cpu.py",
    }
    if args.only:
        # The other figures keep the machine, date and command of the run that measured them.
        machine["command"] += f" --only {' '.join(args.only)}"
        results.setdefault("partial_runs", []).append({"benches": list(args.only), **machine})
    else:
        results["machine"] = machine
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
