"""An evaluation arm: one model with the tokenizer (and, if multimodal, the processor) that feeds it.

The multimodal arm is a saved ProteinLLM (config.json `"model_type": "protein_llava"`): its processor
turns each `<seq> ... </seq>` into encoder input. Any other causal-LM folder, or "smollm2" (the bare
SmolLM2-135M-Instruct decoder), is a text-only arm: the same prompt, sequences read inline as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BatchEncoding, PreTrainedModel

from ..loading import DTYPES, SMOLLM2, is_protein_llm_folder, load_model
from ..processing import ProteinLLMProcessor
from ..sequences import ProteinSequenceError


@dataclass
class Arm:
    """A model under evaluation. `processor` is set for a ProteinLLM and None for a text-only model."""

    name: str
    source: str
    model: PreTrainedModel
    tokenizer: object
    processor: ProteinLLMProcessor | None = None

    @property
    def multimodal(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def decoder_config(self):
        """The config whose attention implementation runs the decoder layers."""
        return self.model.language_model.config if self.multimodal else self.model.config

    def render(self, prompt: str, prompt_format: str, assistant_prefix: str = "") -> str:
        """The text the model reads. "raw": `prompt` itself. "chat": `prompt` as the user turn of the chat
        template with the generation prompt, then `assistant_prefix`."""
        if prompt_format == "raw":
            return prompt
        if prompt_format != "chat":
            raise ValueError(f"prompt_format must be 'raw' or 'chat', got {prompt_format!r}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} ({self.source}) has no chat template; use prompt_format=raw")
        messages = [{"role": "user", "content": prompt}]
        templater = self.processor if self.multimodal else self.tokenizer
        return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + assistant_prefix

    def encode(self, texts: list[str], add_special_tokens: bool) -> BatchEncoding:
        """Token ids, LEFT padded, on the model's device (plus `protein_input_ids` for a ProteinLLM)."""
        if self.multimodal:
            encoding = self.processor(text=texts, padding=True, padding_side="left", add_special_tokens=add_special_tokens)
        else:
            encoding = self.tokenizer(
                texts, padding=True, padding_side="left", add_special_tokens=add_special_tokens, return_tensors="pt"
            )
        return BatchEncoding({key: value.to(self.device) for key, value in encoding.items()})

    def problem(self, text: str) -> str | None:
        """Why this arm cannot read `text` (a reason code), or None. Only proteins can fail: a text-only
        model reads any string."""
        if not self.multimodal:
            return None
        try:
            self.processor.expand_proteins(text)
        except ProteinSequenceError as error:
            return error.reason
        return None


def check_model_source(source: str | None, role: str) -> None:
    """Fail fast, before anything heavy loads, if `source` is neither "smollm2" nor a model folder."""
    if source is None or source == SMOLLM2:
        return
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{role} folder {source} does not exist (give a saved model folder or '{SMOLLM2}')")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{role} folder {source} has no config.json; is it a saved transformers model?")


def load_arm(
    name: str, source: str, dtype: str = "float32", device: str = "auto", attn_implementation: str = "sdpa"
) -> Arm:
    """Load the model at `source` (a folder or "smollm2") as an arm named `name`, in eval mode.

    sdpa by default, whatever the folder was trained with: loglik scoring needs custom attention masks,
    which flash-attention kernels do not take.
    """
    check_model_source(source, name)
    loaded = load_model(source, dtype, device, attn_implementation=attn_implementation)
    return Arm(name, source, loaded.model, loaded.tokenizer, loaded.processor)


__all__ = ["DTYPES", "SMOLLM2", "Arm", "check_model_source", "is_protein_llm_folder", "load_arm"]
