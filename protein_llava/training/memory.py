"""GPU memory per process under FSDP, computed from a preset's shapes (the README's scale-out table).

Parameters are counted exactly, on a model built on the meta device (no memory, no download). What is
estimated, and how:
- weights, gradients and AdamW's two moments in the weights' dtype (the preset's: torch's AdamW keeps its
  state in the parameter's dtype; pure-bf16 moments lose small updates, `model.dtype=float32` avoids that),
  sharded over every process (`training/sharding.py`): the decoder, the projector and LoRA (gradients and
  moments: what trains); the frozen encoder replicated;
- the root unit (embeddings, final norm, LM head, projector) gathered: FSDP2 keeps the root unsharded from
  its forward to its backward; two decoder layers gathered at once (the one computing, the one prefetched);
- unsharded gradients before their reduce-scatter: the root's and one layer's;
- activations (16-bit, flash attention, no s² term): about 34·s·b·h bytes per decoder layer (Korthikanti et
  al. 2022, "Reducing Activation Recomputation in Large Transformer Models"); with gradient checkpointing, each
  layer keeps its input (2·s·b·h bytes) and one layer at a time holds the full 34·s·b·h;
- the loss: `loss_chunk_size` positions of logits at a time, about 16 bytes per logit (bf16 logits, their
  float32 copy, the log-softmax and the gradient).
Not counted: the CUDA context and allocator slack (add 1–3 GiB), the encoder's activations (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.configuration import load_preset
from ..model.modeling import ProteinLLM

GIB = 1024**3
ACTIVATION_BYTES_PER_SBH = 34  # Korthikanti et al. 2022, per layer, 16-bit activations, without the s² attention term
LOSS_BYTES_PER_LOGIT = 16  # bf16 logits (2), their float32 copy (4), log-softmax (4), its gradient (4), slack (2)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of each part of a preset's model, and the shapes the activation estimate needs."""

    encoder: int
    projector: int
    decoder: int
    decoder_layer: int
    decoder_layers: int
    decoder_root: int
    """The decoder's parameters outside its layers: embeddings, final norm, LM head (once if tied)."""
    hidden_size: int
    vocab_size: int
    lora_per_rank: int
    """LoRA parameters per unit of rank r on every linear layer of the decoder's layers (peft's "all-linear":
    the LM head excluded): the sum of (in + out) over those layers."""

    def lora(self, r: int) -> int:
        return r * self.lora_per_rank


def count_parameters(preset: str) -> ParameterCounts:
    """Exact counts from the preset's model built on the meta device."""
    config = load_preset(preset).model_config()
    with torch.device("meta"):
        model = ProteinLLM(config)
    layers = model.language_model.get_decoder().layers
    linear_sides = sum(m.in_features + m.out_features for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    return ParameterCounts(
        encoder=_numel(model.protein_encoder),
        projector=_numel(model.projector),
        decoder=_numel(model.language_model),
        decoder_layer=_numel(layers[0]),
        decoder_layers=len(layers),
        decoder_root=_numel(model.language_model) - _numel(layers),
        hidden_size=config.text_config.hidden_size,
        vocab_size=config.text_config.vocab_size,
        lora_per_rank=linear_sides,
    )


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per process, by item (`rows`), for one configuration."""

    rows: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def estimate_gpu_memory(counts: ParameterCounts, llm: str, world_size: int, seq_len: int, micro_batch: int = 1,
                        weights_dtype: str = "bfloat16", gradient_checkpointing: bool = True, lora_r: int = 16,
                        loss_chunk_size: int = 1024) -> MemoryEstimate:
    """Memory per process of stage 2 under trainer=fsdp over `world_size` processes.

    llm: "full" (the decoder trains whole) or "lora" (LoRA of rank `lora_r` on every linear layer). The
    projector trains in both; the encoder is frozen (replicated, see `training/sharding.py`).
    """
    if llm not in ("full", "lora"):
        raise ValueError(f"llm must be full or lora, got {llm!r}")
    if world_size < 1 or seq_len < 1 or micro_batch < 1:
        raise ValueError("world_size, seq_len and micro_batch must be >= 1")
    width = _DTYPE_BYTES[weights_dtype]
    lora = counts.lora(lora_r) if llm == "lora" else 0
    trainable = counts.projector + (counts.decoder if llm == "full" else lora)
    sharded_weights = counts.decoder + counts.projector + lora
    tokens = seq_len * micro_batch
    layer_activations = ACTIVATION_BYTES_PER_SBH * tokens * counts.hidden_size
    if gradient_checkpointing:
        activations = counts.decoder_layers * 2 * tokens * counts.hidden_size + layer_activations
    else:
        activations = counts.decoder_layers * layer_activations
    root = counts.decoder_root + counts.projector
    # Gradients held whole until their reduce-scatter: the root's trainable part and one layer's.
    layer_lora = lora // counts.decoder_layers
    in_flight = (root + counts.decoder_layer) if llm == "full" else (counts.projector + layer_lora)
    rows = {
        "weights (sharded)": sharded_weights * width / world_size,
        "gradients (sharded)": trainable * width / world_size,
        "AdamW moments (sharded)": 2 * trainable * width / world_size,
        "encoder (frozen, replicated)": counts.encoder * width,
        "root unit, gathered": root * width,
        "decoder layers, gathered (2)": 2 * counts.decoder_layer * width,
        "gradients before reduce-scatter": in_flight * width,
        "activations": activations,
        "loss (logits chunk)": LOSS_BYTES_PER_LOGIT * min(loss_chunk_size, tokens) * counts.vocab_size,
    }
    return MemoryEstimate({name: value / GIB for name, value in rows.items()})


def memory_table(preset: str, seq_len: int, layouts: list[tuple[str, int, int, str | None]], micro_batch: int = 1) -> str:
    """A markdown table, one column per layout (llm, nodes, GPUs per node, weights' dtype or None for the
    preset's): GiB per GPU by item and in total."""
    counts = count_parameters(preset)
    estimates, headers = [], []
    for llm, nodes, gpus, dtype in layouts:
        dtype = dtype or load_preset(preset).dtype
        estimates.append(estimate_gpu_memory(counts, llm, nodes * gpus, seq_len, micro_batch, dtype))
        headers.append(f"{llm}, {dtype}, {nodes} × {gpus}")
    lines = ["| GiB per GPU | " + " | ".join(headers) + " |", "|---" * (len(layouts) + 1) + "|"]
    for name in estimates[0].rows:
        lines.append(f"| {name} | " + " | ".join(f"{e.rows[name]:.2f}" for e in estimates) + " |")
    lines.append("| **total** | " + " | ".join(f"**{e.total:.1f}**" for e in estimates) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="GPU memory per process under trainer=fsdp (stage 2), from a preset's shapes")
    parser.add_argument("--preset", default="esm2-650m-internlm2-7b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    args = parser.parse_args(argv)
    counts = count_parameters(args.preset)
    print(f"{args.preset}: encoder {counts.encoder:,}, projector {counts.projector:,}, decoder {counts.decoder:,} parameters; "
          f"LoRA r=16 {counts.lora(16):,}; sequence {args.seq_len} tokens, micro-batch {args.micro_batch}, gradient checkpointing on\n")
    layouts = [("lora", 1, 8, None), ("full", 1, 8, None), ("full", 1, 8, "float32"), ("full", 2, 8, "float32"), ("full", 4, 8, "float32")]
    print(memory_table(args.preset, args.seq_len, layouts, args.micro_batch))


if __name__ == "__main__":
    main()
