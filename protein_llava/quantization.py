"""4-bit decoders (bitsandbytes NF4): the QLoRA base in stage 2, and optional 4-bit inference.

Only the decoder is ever quantised: ESM-2 and the projector stay in full precision (they are small and
the projector trains). Quantisation goes through transformers' bitsandbytes quantizer, i.e. a
`from_pretrained(..., quantization_config=...)` load; the NF4 settings are those of the QLoRA paper.
bitsandbytes 0.50 runs these layers on CPU too (training about as fast as LoRA on the unquantised
decoder, i.e. slowly): good for tests and small decoders.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

# ProteinLLM's full-precision parts, matched by transformers as module-name prefixes.
FULL_PRECISION_PARTS = ("protein_encoder", "projector")


def nf4_config(compute_dtype: torch.dtype = torch.float32, double_quant: bool = True) -> BitsAndBytesConfig:
    """4-bit NormalFloat weights; `compute_dtype` is what each matmul runs in after de-quantising a block;
    `double_quant` also quantises the per-block scales (about 0.37 bits a weight saved, QLoRA paper)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def decoder_only(quantization_config: BitsAndBytesConfig) -> BitsAndBytesConfig:
    """A copy of `quantization_config` that leaves the encoder, the projector and the LM head unquantised.

    transformers skips only the modules in `llm_int8_skip_modules` once that list is given, so the
    default skip (the output embeddings) is named again as "lm_head".
    """
    if not isinstance(quantization_config, BitsAndBytesConfig):
        raise TypeError(f"quantization_config must be a BitsAndBytesConfig, got {type(quantization_config).__name__}")
    config = copy.deepcopy(quantization_config)
    skipped = list(config.llm_int8_skip_modules or ["lm_head"])
    config.llm_int8_skip_modules = [*skipped, *(part for part in FULL_PRECISION_PARTS if part not in skipped)]
    return config


def quantize_decoder(model: PreTrainedModel, quantization_config: BitsAndBytesConfig) -> PreTrainedModel:
    """`model` reloaded in 4-bit through transformers' quantizer (for decoders built in memory: the random
    tiny one, SmolLM2 de-quantised from GGUF). It is saved to a temporary folder first, at its own dtype."""
    name = model.config._name_or_path
    with tempfile.TemporaryDirectory(prefix="protein-llava-quantize-") as folder:
        model.save_pretrained(folder)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=quantization_config,
            dtype=model.dtype,
            attn_implementation=model.config._attn_implementation,
        )
    quantized.config._name_or_path = quantized.name_or_path = name  # not the temporary folder
    return quantized


def is_4bit(model: nn.Module) -> bool:
    """Whether any of `model`'s layers is a bitsandbytes 4-bit linear layer."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    return any(isinstance(module, Linear4bit) for module in model.modules())


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of a 4-bit model's layers (its quantization config's `bnb_4bit_compute_dtype`)."""
    from bitsandbytes.nn import Linear4bit

    return next(module.compute_dtype or torch.float32 for module in model.modules() if isinstance(module, Linear4bit))


def keep_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes repacking `model`'s 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50.2, on CPUs with AVX512-BF16, repacks a Linear4bit's weights in place the first time
    it runs in eval mode without gradients (validation, generation). That layout computes in bfloat16 and
    passes no gradient back to the layer's input, and transformers' dequantize misreads it: a QLoRA run
    that validates would then train only its last layers and export wrong weights.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _check_training_layout(model: nn.Module) -> None:
    from bitsandbytes.nn import Linear4bit

    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                f"{name} holds 4-bit weights repacked for bitsandbytes' CPU inference kernel; they cannot be "
                "de-quantised. Call quantization.keep_training_layout(model) before running it in eval mode."
            )


def describe_qlora(double_quant: bool, compute_dtype: str, merged: bool, saved_dtype: str | None = None) -> str:
    """How a QLoRA decoder was trained and exported, in the words of both model cards (the export folder's
    own, from the model, and `protein-llava export`'s, from the run config)."""
    how = "adapter merged into the de-quantised weights" if merged else "adapter kept apart in adapter/, base de-quantised"
    return (
        f"on a 4-bit NF4 decoder (bitsandbytes, double quantisation {'on' if double_quant else 'off'}, compute "
        f"dtype {compute_dtype}); exported with the {how}" + (f" in {saved_dtype}" if saved_dtype else "")
        + ", so the folder loads without bitsandbytes"
    )


def merge_qlora(peft_model: nn.Module, merge_adapter: bool = True) -> PreTrainedModel:
    """A plain, unquantised decoder from a LoRA-wrapped 4-bit one: the standard QLoRA export.

    The 4-bit weights are de-quantised (to the dtype the decoder was loaded in), then the adapter is added
    onto them in that precision (`merge_adapter=False`: left off). Merging into the 4-bit layers instead,
    as peft does, would round every merged weight back to 4 bits and lose most of the small LoRA delta.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    _check_training_layout(peft_model)
    adapter_config = copy.deepcopy(peft_model.peft_config["default"])
    adapter = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # tensors outlive unload()
    base = peft_model.unload()  # the 4-bit decoder, adapter layers removed
    dtype = base.config.dtype
    base = base.dequantize(dtype=dtype)
    base.to(dtype)  # prepare_model_for_kbit_training had upcast norms and embeddings to float32
    base.is_loaded_in_4bit = False
    if not merge_adapter:
        return base
    wrapped = get_peft_model(base, adapter_config)
    set_peft_model_state_dict(wrapped, adapter)
    return wrapped.merge_and_unload()
