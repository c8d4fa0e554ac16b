"""Convert InternLM2 checkpoints (e.g. internlm/internlm2-chat-7b) to the native `LlamaForCausalLM` layout.

transformers 5 has no InternLM2 class and InternLM2's remote code no longer runs on it. InternLM2 is a
Llama with renamed modules and one packed `wqkv` projection, so the weights convert losslessly:

- `attention.wqkv` is grouped per key/value head: for each of the `num_key_value_heads` groups it holds
  `num_attention_heads // num_key_value_heads` query heads, then one key head, then one value head.
  It is split into `q_proj`, `k_proj`, `v_proj` (see `split_wqkv`).
- Everything else is a rename (`attention.wo` -> `self_attn.o_proj`, `feed_forward.w1/w3/w2` ->
  `mlp.gate_proj/up_proj/down_proj`, `attention_norm` / `ffn_norm` -> `input_layernorm` /
  `post_attention_layernorm`, `tok_embeddings` -> `embed_tokens`, `output` -> `lm_head`).

The SentencePiece `tokenizer.model` becomes a fast tokenizer that encodes like SentencePiece, with the
chat tokens of `tokenizer_config.json` (`<|im_start|>`, `<|im_end|>`, ...) kept at their ids and
InternLM2's ChatML template (`INTERNLM2_CHAT_TEMPLATE`).

CLI: `python -m protein_llava.convert.internlm2 SRC DST [--dtype bfloat16]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import AddedToken
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

from ..loading import DTYPES, torch_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "INTERNLM2_CHAT_TEMPLATE",
    "convert_internlm2_checkpoint",
    "convert_internlm2_state_dict",
    "convert_internlm2_tokenizer",
    "internlm2_config_to_llama",
    "main",
    "read_internlm2_config",
    "split_wqkv",
]

# InternLM2's ChatML: BOS once, then one `<|im_start|>role\ncontent<|im_end|>\n` block per message (a system
# turn only when the conversation has one); `add_generation_prompt` opens the assistant turn.
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Per-layer renames: InternLM2 suffix -> Llama suffix, both under `model.layers.{i}.`.
_LAYER_RENAMES = (
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
_WQKV_SUFFIX = "attention.wqkv.weight"
_EMBEDDINGS, _FINAL_NORM, _OUTPUT = "model.tok_embeddings.weight", "model.norm.weight", "output.weight"
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Old checkpoints saved the rotary buffer; Llama recomputes it from the config.
_ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.attention\.rotary_emb\.inv_freq")

# InternLM2Config defaults, used when config.json leaves a key out.
_CONFIG_DEFAULTS = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}
_REQUIRED_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


# --------------------------------------------------------------------------------------------------- config


def read_internlm2_config(src_dir: str | Path) -> dict:
    """Read `config.json` of an InternLM2 folder; ValueError if it is missing or not `model_type: internlm2`."""
    path = Path(src_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{src_dir} is not an InternLM2 checkpoint folder: it has no config.json")
    config = json.loads(path.read_text())
    if config.get("model_type") != "internlm2":
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}, expected 'internlm2'")
    return config


def internlm2_config_to_llama(internlm2_config: dict) -> LlamaConfig:
    """The `LlamaConfig` equivalent of an InternLM2 `config.json` dict.

    Raises ValueError for configs Llama cannot represent: `bias: true` (also InternLM2's default when the key
    is absent), head counts that do not divide, unknown rope scaling.
    """
    cfg = {**_CONFIG_DEFAULTS, **internlm2_config}
    if cfg.get("model_type", "internlm2") != "internlm2":
        raise ValueError(f"expected an InternLM2 config, got model_type {cfg['model_type']!r}")
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"InternLM2 config lacks required keys: {', '.join(missing)}")
    if cfg.get("bias", True):
        raise ValueError(
            "InternLM2 config has bias=True (InternLM2's default when 'bias' is absent); only bias-free "
            "checkpoints convert to LlamaForCausalLM"
        )

    hidden_size, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")

    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden_size,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act=cfg["hidden_act"],
        max_position_embeddings=cfg["max_position_embeddings"],
        initializer_range=cfg["initializer_range"],
        rms_norm_eps=cfg["rms_norm_eps"],
        use_cache=cfg["use_cache"],
        pad_token_id=cfg["pad_token_id"],
        bos_token_id=cfg["bos_token_id"],
        eos_token_id=cfg["eos_token_id"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        rope_parameters=_rope_parameters(cfg["rope_theta"], cfg.get("rope_scaling")),
        attention_bias=False,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def _rope_parameters(rope_theta: float, rope_scaling: dict | None) -> dict:
    """transformers 5 `rope_parameters` for InternLM2's `rope_theta` + `rope_scaling` ({type, factor} or None).

    InternLM2's dynamic NTK and linear scaling use the same formulas as transformers' "dynamic" and "linear".
    """
    params = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling is None:
        return params
    rope_type = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if rope_type not in ("dynamic", "linear"):
        raise ValueError(f"unsupported InternLM2 rope_scaling {rope_scaling!r}: type must be 'dynamic' or 'linear'")
    factor = rope_scaling.get("factor")
    if not isinstance(factor, int | float) or factor < 1.0:
        raise ValueError(f"InternLM2 rope_scaling factor must be a number >= 1, got {factor!r}")
    return {**params, "rope_type": rope_type, "factor": float(factor)}


# ---------------------------------------------------------------------------------------------- state dict


def split_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's packed, kv-grouped `wqkv` weight into Llama's q, k and v projection weights.

    Rows of `wqkv` are laid out as (kv group, [q_0 .. q_{n-1}, k, v], head_dim) with n = num_heads // num_kv_heads,
    so query head g * n + j belongs to kv group g, which is the head order Llama's `repeat_kv` expects.
    """
    q_per_kv = num_heads // num_kv_heads
    hidden = wqkv.shape[-1]
    # (num_kv_heads * (q_per_kv + 2) * head_dim, hidden) -> (num_kv_heads, q_per_kv + 2, head_dim, hidden)
    grouped = wqkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, hidden)
    # clone() so the three outputs own their memory instead of viewing the packed tensor.
    q = grouped[:, :q_per_kv].reshape(num_heads * head_dim, hidden).clone()  # (num_heads * head_dim, hidden)
    k = grouped[:, q_per_kv].reshape(num_kv_heads * head_dim, hidden).clone()  # (num_kv_heads * head_dim, hidden)
    v = grouped[:, q_per_kv + 1].reshape(num_kv_heads * head_dim, hidden).clone()  # (num_kv_heads * head_dim, hidden)
    return q, k, v


def _expected_source_keys(config: LlamaConfig) -> set[str]:
    """Every tensor an InternLM2 checkpoint with this config must hold."""
    keys = {_EMBEDDINGS, _FINAL_NORM}
    if not config.tie_word_embeddings:
        keys.add(_OUTPUT)
    for i in range(config.num_hidden_layers):
        keys.add(f"model.layers.{i}.{_WQKV_SUFFIX}")
        keys.update(f"model.layers.{i}.{suffix}" for suffix, _ in _LAYER_RENAMES)
    return keys


def _check_source_keys(keys: set[str], config: LlamaConfig) -> None:
    """ValueError naming every unknown and every missing InternLM2 key (rotary buffers are allowed extras)."""
    expected = _expected_source_keys(config)
    unknown = sorted(key for key in keys - expected if not _ROTARY_BUFFER.fullmatch(key))
    missing = sorted(expected - keys)
    problems = []
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)}")
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if problems:
        raise ValueError("InternLM2 state dict does not match its config; " + "; ".join(problems))


def _convert_tensor(name: str, tensor: torch.Tensor, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The Llama tensors for one InternLM2 tensor (none for an ignored rotary buffer)."""
    if _ROTARY_BUFFER.fullmatch(name):
        return {}
    if name == _EMBEDDINGS:
        return {"model.embed_tokens.weight": tensor}
    if name == _FINAL_NORM:
        return {"model.norm.weight": tensor}
    if name == _OUTPUT:
        return {"lm_head.weight": tensor}

    match = _LAYER_KEY.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown InternLM2 key: {name}")
    prefix, suffix = f"model.layers.{match.group(1)}.", match.group(2)
    if suffix == _WQKV_SUFFIX:
        num_heads, num_kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        expected_rows = (num_heads + 2 * num_kv_heads) * head_dim
        if tensor.ndim != 2 or tensor.shape[0] != expected_rows:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected ({expected_rows}, hidden_size)")
        q, k, v = split_wqkv(tensor, num_heads, num_kv_heads, head_dim)
        return {
            prefix + "self_attn.q_proj.weight": q,
            prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v,
        }
    for old, new in _LAYER_RENAMES:
        if suffix == old:
            return {prefix + new: tensor}
    raise ValueError(f"unknown InternLM2 key: {name}")


def convert_internlm2_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: LlamaConfig | dict
) -> dict[str, torch.Tensor]:
    """Map an InternLM2 state dict to `LlamaForCausalLM` keys, splitting each packed `wqkv`.

    `config` is the converted `LlamaConfig` or the InternLM2 config dict. Raises ValueError naming any
    unknown or missing key; `attention.rotary_emb.inv_freq` buffers are dropped on purpose.
    """
    if not isinstance(config, LlamaConfig):
        config = internlm2_config_to_llama(config)
    _check_source_keys(set(state_dict), config)
    converted = {}
    for name, tensor in state_dict.items():
        converted.update(_convert_tensor(name, tensor, config))
    return converted


# --------------------------------------------------------------------------------------------- checkpoints


def _weight_files(src: Path) -> list[Path]:
    """The weight shards of an HF folder, safetensors preferred over `pytorch_model*.bin`."""
    layouts = (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    )
    for index_name, pattern in layouts:
        index = src / index_name
        if index.is_file():
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [src / name for name in shard_names]
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{src} has no *.safetensors or pytorch_model*.bin weights")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # mmap keeps the shard on disk; tensors are paged in as they are converted.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _shard_keys(path: Path) -> list[str]:
    """Tensor names in one shard, without reading the tensors."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as shard:
            return list(shard.keys())
    return list(_load_bin(path))


def _iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one shard, read one tensor at a time."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)
    else:
        yield from _load_bin(path).items()


def _llama_from_state_dict(state_dict: dict[str, torch.Tensor], config: LlamaConfig) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` whose parameters are the given tensors (no second copy is allocated).

    Only meant for saving: the model is built on the meta device, so its rotary buffers stay unmaterialised.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise ValueError(
            f"converted weights do not fit LlamaForCausalLM: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def convert_internlm2_checkpoint(
    src_dir: str | Path, dst_dir: str | Path, dtype: torch.dtype | str | None = None
) -> Path:
    """Convert an InternLM2 HF folder into a `LlamaForCausalLM` folder (safetensors) plus fast tokenizer.

    Reads `config.json`, checks every tensor name first, then converts the `*.safetensors` (or
    `pytorch_model*.bin`, memory-mapped) shards one tensor at a time, so the source is never held in memory
    next to the converted copy; the model is then built around that copy without duplicating it.

    `dtype` (a torch dtype or "float32"/"float16"/"bfloat16") casts every weight; None keeps the checkpoint's
    dtype. A `generation_config.json` is carried over, and `tokenizer.model` (+ `tokenizer_config.json`) is
    converted by `convert_internlm2_tokenizer` when present (a warning is logged when it is not).
    Returns `dst_dir` as a Path.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.resolve() == src.resolve():
        raise ValueError("destination must differ from the source folder")
    config = internlm2_config_to_llama(read_internlm2_config(src))
    target_dtype = torch_dtype(dtype)

    files = _weight_files(src)
    _check_source_keys({key for path in files for key in _shard_keys(path)}, config)
    converted: dict[str, torch.Tensor] = {}
    for path in files:
        logger.info("converting %s", path)
        for name, tensor in _iter_shard(path):
            for new_name, new_tensor in _convert_tensor(name, tensor, config).items():
                converted[new_name] = new_tensor if target_dtype is None else new_tensor.to(target_dtype)

    model = _llama_from_state_dict(converted, config)
    del converted
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    del model

    if (src / "tokenizer.model").is_file():
        convert_internlm2_tokenizer(src, dst)
    else:
        logger.warning("%s has no tokenizer.model; wrote the model without a tokenizer", src)
    return dst


# ------------------------------------------------------------------------------------------------ tokenizer


def _token_content(value: str | dict | None) -> str | None:
    """A special token's text from tokenizer_config.json, where it is a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _added_tokens(tokenizer_config: dict, pieces: list[str]) -> dict[int, AddedToken]:
    """tokenizer_config.json's added tokens as {id: AddedToken}.

    Tokens come from `added_tokens_decoder`; an `additional_special_tokens` entry missing there must be a
    SentencePiece piece and keeps that piece's id.
    """
    added = {}
    for token_id, spec in tokenizer_config.get("added_tokens_decoder", {}).items():
        added[int(token_id)] = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            # Matched on the raw text, so the SentencePiece dummy prefix never lands inside them.
            normalized=False,
            special=spec.get("special", True),
        )
    known = {token.content for token in added.values()}
    piece_ids = {piece: token_id for token_id, piece in enumerate(pieces)}
    for content in map(_token_content, tokenizer_config.get("additional_special_tokens", [])):
        if content in known:
            continue
        if content not in piece_ids:
            raise ValueError(f"special token {content!r} is neither in added_tokens_decoder nor in tokenizer.model")
        added[piece_ids[content]] = AddedToken(content, normalized=False, special=True)
    return added


def _vocab_with_added_tokens(pieces: list[str], added: dict[int, AddedToken]) -> dict[str, int]:
    """{piece: id} of the SentencePiece model, with the added tokens at their ids.

    InternLM2 names its chat tokens by overwriting placeholder pieces (`[UNUSED_TOKEN_146]` -> `<|im_start|>`);
    ids past the SentencePiece vocabulary must follow it without gaps.
    """
    names = list(pieces)
    for token_id in sorted(added):
        content = added[token_id].content
        if token_id < len(names):
            names[token_id] = content
        elif token_id == len(names):
            names.append(content)
        else:
            raise ValueError(f"added token {content!r} has id {token_id}, past the vocabulary size {len(names)}")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"added tokens collide with other vocabulary entries: {duplicates}")
    return {name: token_id for token_id, name in enumerate(names)}


def _spm_model_proto_class() -> type:
    """SentencePiece's `ModelProto` message class (sentencepiece 0.2.3 needs protobuf >= 7.36.1, pinned)."""
    return import_protobuf().ModelProto


def _load_spm_proto(path: Path):
    """The parsed SentencePiece ModelProto of `tokenizer.model`."""
    proto = _spm_model_proto_class()()
    proto.ParseFromString(path.read_bytes())
    return proto


def convert_internlm2_tokenizer(src_dir: str | Path, dst_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer from InternLM2's `tokenizer.model` + `tokenizer_config.json`; save it to `dst_dir`.

    Ordinary text encodes exactly as `sentencepiece` does (the tokenizer follows the model's normalizer spec;
    like InternLM2's own tokenizers, each chunk between special tokens gets the dummy prefix). Tokens of
    `added_tokens_decoder` keep their ids, BOS is prepended as in InternLM2, and the chat template is
    `INTERNLM2_CHAT_TEMPLATE`.
    """
    src = Path(src_dir)
    proto = _load_spm_proto(src / "tokenizer.model")
    if proto.trainer_spec.model_type != 2:  # ModelType.BPE
        raise ValueError(f"{src / 'tokenizer.model'} is not a SentencePiece BPE model, as InternLM2's is")
    config_path = src / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    pieces = [piece.piece for piece in proto.pieces]
    added = _added_tokens(tokenizer_config, pieces)
    vocab = _vocab_with_added_tokens(pieces, added)
    # legacy=True: the dummy prefix goes on every chunk between special tokens, as in InternLM2's tokenizers.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    backend.add_tokens([token for _, token in sorted(added.items())])
    wrong = {token.content: i for i, token in added.items() if backend.token_to_id(token.content) != i}
    if wrong:
        raise ValueError(f"added tokens did not keep their ids: {wrong}")

    special = {
        name: _token_content(tokenizer_config.get(name, default))
        for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", None))
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{name: content for name, content in special.items() if content is not None},
        add_bos_token=tokenizer_config.get("add_bos_token", True),
        add_eos_token=tokenizer_config.get("add_eos_token", False),
        clean_up_tokenization_spaces=False,
        chat_template=INTERNLM2_CHAT_TEMPLATE,
    )
    if dst_dir is not None:
        tokenizer.save_pretrained(dst_dir)
    return tokenizer


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """CLI: convert the InternLM2 folder SRC into a Llama folder DST. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m protein_llava.convert.internlm2",
        description="Convert an InternLM2 Hugging Face checkpoint to the native Llama layout.",
    )
    parser.add_argument("src", type=Path, help="InternLM2 folder (config.json, weights, tokenizer.model)")
    parser.add_argument("dst", type=Path, help="output folder for the LlamaForCausalLM checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    args = parser.parse_args(argv)
    try:
        dst = convert_internlm2_checkpoint(args.src, args.dst, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote LlamaForCausalLM checkpoint to {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
