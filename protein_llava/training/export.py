"""A training run → a self-contained folder `from_pretrained` loads (LoRA adapter merged by default)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..modeling import ProteinLLM


def export_run(model: nn.Module, processor, tokenizer, folder: Path, merge_adapter: bool = True) -> Path:
    """Write `folder`: a ProteinLLM (config, safetensors, processor, model card) or, for the text-only arm,
    a plain transformers causal-LM folder with its tokenizer.

    With `merge_adapter=False` the base weights are written unmerged and the adapter goes to `folder/adapter`.
    This is the end of a run: a LoRA-wrapped decoder is unwrapped in place (merged or unloaded).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    language_model = model.language_model if isinstance(model, ProteinLLM) else model
    plain = language_model
    if hasattr(language_model, "peft_config"):
        if not merge_adapter:
            language_model.save_pretrained(folder / "adapter")
        plain = language_model.merge_and_unload() if merge_adapter else language_model.unload()
    if isinstance(model, ProteinLLM):
        model.language_model = plain
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    else:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder
