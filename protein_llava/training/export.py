"""A training run → a self-contained folder `from_pretrained` loads (LoRA adapter merged by default)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..modeling import ProteinLLM
from ..quantization import compute_dtype, is_4bit, merge_qlora


def export_run(model: nn.Module, processor, tokenizer, folder: Path, merge_adapter: bool = True) -> Path:
    """Write `folder`: a ProteinLLM (config, safetensors, processor, model card) or, for the text-only arm,
    a plain transformers causal-LM folder with its tokenizer.

    With `merge_adapter=False` the base weights are written unmerged and the adapter goes to `folder/adapter`.
    This is the end of a run: a LoRA-wrapped decoder is unwrapped in place (merged or unloaded).
    A 4-bit (QLoRA) decoder is de-quantised first and the adapter merged into that full-precision copy
    (`quantization.merge_qlora`), so the folder loads without bitsandbytes; the model card says so.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    language_model = model.language_model if isinstance(model, ProteinLLM) else model
    plain = language_model
    card = {}
    if is_4bit(language_model):
        card = {"training": {"decoder fine-tuning": qlora_card_row(language_model, merge_adapter)}}
        if hasattr(language_model, "peft_config") and not merge_adapter:
            language_model.save_pretrained(folder / "adapter")
        plain = merge_qlora(language_model, merge_adapter)
    elif hasattr(language_model, "peft_config"):
        if not merge_adapter:
            language_model.save_pretrained(folder / "adapter")
        plain = language_model.merge_and_unload() if merge_adapter else language_model.unload()
    if isinstance(model, ProteinLLM):
        model.language_model = plain
        if hasattr(model.protein_encoder.esm, "peft_config"):
            # Encoder LoRA is always merged: a saved ProteinLLM holds a plain fair-esm ESM2.
            if not merge_adapter:
                model.protein_encoder.esm.save_pretrained(folder / "encoder_adapter")
            model.protein_encoder.esm = model.protein_encoder.esm.merge_and_unload()
        model.save_pretrained(folder, model_card=card)
        processor.save_pretrained(folder)
    else:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def qlora_card_row(language_model: nn.Module, merged: bool) -> str:
    """The model card's line for a decoder trained with QLoRA (read before the 4-bit layers are replaced)."""
    quantization = language_model.config.quantization_config
    double = "on" if quantization.bnb_4bit_use_double_quant else "off"
    saved = str(language_model.config.dtype).removeprefix("torch.")
    how = "merged into the de-quantised weights" if merged else "kept apart in adapter/, base de-quantised"
    return (
        f"QLoRA: LoRA adapters trained on a 4-bit {quantization.bnb_4bit_quant_type.upper()} decoder "
        f"(bitsandbytes, double quantisation {double}, compute dtype "
        f"{str(compute_dtype(language_model)).removeprefix('torch.')}); exported {how} in {saved}, "
        "so this folder loads without bitsandbytes"
    )

