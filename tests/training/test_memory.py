"""training/memory.py: parameter counts from the meta-device build against a real model, and how the
estimate scales with the number of processes."""

import pytest

from protein_llava import build_tiny
from protein_llava.training.config import LoraSettings
from protein_llava.training.memory import GIB, count_parameters, estimate_gpu_memory
from protein_llava.training.stage import apply_stage_spec, stage2_spec


def test_counts_equal_a_real_model_and_peft_lora():
    counts = count_parameters("tiny")
    model, _ = build_tiny(seed=0)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (counts.encoder, counts.projector, counts.decoder) == (
        numel(model.protein_encoder), numel(model.projector), numel(model.language_model)
    )
    layers = model.language_model.get_decoder().layers
    assert counts.decoder_layers == len(layers) and counts.decoder_layer == numel(layers[0])
    assert counts.decoder_root == numel(model.language_model) - numel(layers) > 0
    # peft's "all-linear" LoRA of rank 4, counted by peft itself, against the estimate's count.
    model = apply_stage_spec(model, stage2_spec("lora"), LoraSettings(r=4))
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert lora == counts.lora(4) > 0


def test_sharded_items_shrink_with_the_processes_and_the_rest_does_not():
    counts = count_parameters("tiny")
    one, eight = (estimate_gpu_memory(counts, "full", world, seq_len=256) for world in (1, 8))
    for name in one.rows:
        ratio = one.rows[name] / eight.rows[name]
        assert ratio == pytest.approx(8 if "sharded" in name else 1), name
    full = estimate_gpu_memory(counts, "full", 1, seq_len=256, weights_dtype="float32")
    # Full fine-tuning in float32: 16 bytes per decoder parameter in weights, gradient and two moments.
    decoder_and_projector = counts.decoder + counts.projector
    sharded = sum(v for k, v in full.rows.items() if "sharded" in k)
    assert sharded * GIB == pytest.approx(16 * decoder_and_projector)
    lora = estimate_gpu_memory(counts, "lora", 1, seq_len=256, weights_dtype="float32", lora_r=4)
    assert lora.rows["AdamW moments (sharded)"] * GIB == pytest.approx(2 * 4 * (counts.projector + counts.lora(4)))
    with pytest.raises(ValueError, match="llm must be full or lora"):
        estimate_gpu_memory(counts, "qlora", 1, seq_len=256)
