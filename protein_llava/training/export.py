"""A training run → a self-contained folder `from_pretrained` loads (LoRA adapter merged by default)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..model.modeling import ProteinLLM
from ..quantization import compute_dtype, describe_qlora, is_4bit, merge_qlora
from .run_folder import save_adapters


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
    if not merge_adapter:
        save_adapters(model, folder)
    if is_4bit(language_model):
        card = {"training": {"decoder fine-tuning": qlora_card_row(language_model, merge_adapter)}}
        plain = merge_qlora(language_model, merge_adapter)
    elif hasattr(language_model, "peft_config"):
        plain = language_model.merge_and_unload() if merge_adapter else language_model.unload()
    if isinstance(model, ProteinLLM):
        model.language_model = plain
        if hasattr(model.protein_encoder.esm, "peft_config"):
            # Encoder LoRA is always merged: a saved ProteinLLM holds a plain fair-esm ESM2.
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
    return "QLoRA: LoRA adapters trained " + describe_qlora(
        double_quant=quantization.bnb_4bit_use_double_quant,
        compute_dtype=str(compute_dtype(language_model)).removeprefix("torch."),
        merged=merged,
        saved_dtype=str(language_model.config.dtype).removeprefix("torch."),
    )
