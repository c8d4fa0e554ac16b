"""InternLM2 -> Llama conversion: logits against an independent InternLM2 forward pass, files, errors, tokenizer."""

import io
import json
import math
import random

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from protein_llava.convert.internlm2 import (
    INTERNLM2_CHAT_TEMPLATE,
    _spm_model_proto_class,
    convert_internlm2_checkpoint,
    convert_internlm2_state_dict,
    convert_internlm2_tokenizer,
    internlm2_config_to_llama,
    main,
)


def internlm2_config(**overrides) -> dict:
    """A tiny InternLM2 config.json, with the bookkeeping keys real ones carry."""
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
        "attn_implementation": "eager",
        "model_type": "internlm2",
        "torch_dtype": "float32",
        "bias": False,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    return {**config, **overrides}


def random_internlm2_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in InternLM2's layout (packed, kv-grouped wqkv)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads

    def weight(*shape):
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    def norm():
        return 1.0 + 0.1 * torch.randn(hidden, generator=gen)

    state = {"model.tok_embeddings.weight": torch.randn(vocab, hidden, generator=gen), "model.norm.weight": norm()}
    if not config["tie_word_embeddings"]:
        state["output.weight"] = weight(vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        state[prefix + "attention.wqkv.weight"] = weight((heads + 2 * kv_heads) * head_dim, hidden)
        state[prefix + "attention.wo.weight"] = weight(hidden, heads * head_dim)
        state[prefix + "feed_forward.w1.weight"] = weight(inter, hidden)
        state[prefix + "feed_forward.w3.weight"] = weight(inter, hidden)
        state[prefix + "feed_forward.w2.weight"] = weight(hidden, inter)
        state[prefix + "attention_norm.weight"] = norm()
        state[prefix + "ffn_norm.weight"] = norm()
    return state


# ------------------------------------------------------------------ independent InternLM2 reference forward


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, theta, linear_factor):
    """InternLM2 rotary embedding (half rotation, cos/sin of cat(freqs, freqs)) on (batch, heads, seq, head_dim)."""
    seq_len, head_dim = x.shape[-2:]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    positions = torch.arange(seq_len, dtype=torch.float32) / linear_factor
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def internlm2_attention(x, state, prefix, config):
    batch, seq_len, hidden = x.shape
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, q_per_kv = hidden // heads, heads // kv_heads
    scaling = config["rope_scaling"] or {"type": None}
    # Dynamic NTK only changes the base past max_position_embeddings, which these inputs stay below.
    linear_factor = scaling["factor"] if scaling["type"] == "linear" else 1.0

    qkv = (x @ state[prefix + "attention.wqkv.weight"].T).view(batch, seq_len, kv_heads, q_per_kv + 2, head_dim)
    q = qkv[..., :q_per_kv, :].reshape(batch, seq_len, heads, head_dim).transpose(1, 2)
    k = qkv[..., -2, :].transpose(1, 2)
    v = qkv[..., -1, :].transpose(1, 2)
    q = apply_rotary(q, config["rope_theta"], linear_factor)
    k = apply_rotary(k, config["rope_theta"], linear_factor)
    k, v = k.repeat_interleave(q_per_kv, dim=1), v.repeat_interleave(q_per_kv, dim=1)

    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
    return out @ state[prefix + "attention.wo.weight"].T


def internlm2_reference_logits(state, config, input_ids):
    eps = config["rms_norm_eps"]
    x = state["model.tok_embeddings.weight"][input_ids]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        x = x + internlm2_attention(rms_norm(x, state[prefix + "attention_norm.weight"], eps), state, prefix, config)
        h = rms_norm(x, state[prefix + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(h @ state[prefix + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ state[prefix + "feed_forward.w3.weight"].T)) @ state[prefix + "feed_forward.w2.weight"].T
    x = rms_norm(x, state["model.norm.weight"], eps)
    output = state.get("output.weight", state["model.tok_embeddings.weight"])
    return x @ output.T


def random_input_ids(config, seed=1):
    return torch.randint(0, config["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(seed))


def llama_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


# ---------------------------------------------------------------------------------------- state dict tests


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"num_key_value_heads": 2}, id="gqa"),
        pytest.param({"num_key_value_heads": 4}, id="mha"),
        pytest.param({"num_key_value_heads": 1}, id="mqa"),
        pytest.param({"num_attention_heads": 8, "num_key_value_heads": 2}, id="gqa-4-queries-per-kv"),
        pytest.param({"rope_scaling": {"type": "linear", "factor": 2.0}}, id="linear-rope"),
        pytest.param({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, id="dynamic-rope"),
        pytest.param({"tie_word_embeddings": True}, id="tied"),
    ],
)
def test_converted_llama_matches_internlm2_forward(overrides):
    config = internlm2_config(**overrides)
    state = random_internlm2_state_dict(config)
    llama_config = internlm2_config_to_llama(config)
    model = AutoModelForCausalLM.from_config(llama_config, attn_implementation="eager").eval()

    model.load_state_dict(convert_internlm2_state_dict(state, llama_config), strict=not config["tie_word_embeddings"])
    if config["tie_word_embeddings"]:
        model.tie_weights()

    input_ids = random_input_ids(config)
    expected = internlm2_reference_logits(state, config, input_ids)
    torch.testing.assert_close(llama_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_config_maps_rope_scaling_to_rope_parameters():
    default = internlm2_config_to_llama(internlm2_config(rope_theta=1e6))
    assert default.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    dynamic = internlm2_config_to_llama(internlm2_config(rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert dynamic.rope_parameters == {"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 2.0}
    assert (default.head_dim, default.num_key_value_heads, default.pad_token_id) == (16, 2, 2)
    with pytest.raises(ValueError, match="rope_scaling"):
        internlm2_config_to_llama(internlm2_config(rope_scaling={"type": "yarn", "factor": 2.0}))


def test_unknown_key_is_named():
    config = internlm2_config()
    state = random_internlm2_state_dict(config)
    state["model.layers.0.attention.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown keys: model\.layers\.0\.attention\.extra\.weight"):
        convert_internlm2_state_dict(state, config)


def test_missing_key_is_named():
    config = internlm2_config()
    state = random_internlm2_state_dict(config)
    del state["model.layers.1.feed_forward.w3.weight"]
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.feed_forward\.w3\.weight"):
        convert_internlm2_state_dict(state, config)


def test_rotary_buffers_are_ignored():
    config = internlm2_config()
    state = random_internlm2_state_dict(config)
    state["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    converted = convert_internlm2_state_dict(state, config)
    assert not any("rotary" in key for key in converted)


@pytest.mark.parametrize("overrides", [{"bias": True}, {"bias": None}], ids=["bias-true", "bias-absent"])
def test_bias_is_rejected(overrides):
    config = internlm2_config(**overrides)
    if config["bias"] is None:
        del config["bias"]  # InternLM2Config defaults to bias=True
    with pytest.raises(ValueError, match="bias"):
        internlm2_config_to_llama(config)


# ------------------------------------------------------------------------------------------ tokenizer setup

SPM_VOCAB_SIZE = 400  # learned pieces, before the 6 InternLM2-style placeholders
CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
IM_END_ID, IM_START_ID = SPM_VOCAB_SIZE + 4, SPM_VOCAB_SIZE + 5
WORDS = ("protein", "sequence", "fold", "alpha", "helix", "beta", "sheet", "binding", "site", "enzyme", "kinase")
WORDS += ("domain", "the", "a", "of", "and", "is", "in", "with", "residue", "amino", "acid", "ATP", "42", "1999")


def train_internlm2_like_spm(add_dummy_prefix: bool):
    """A tiny byte-fallback BPE model ending in `[UNUSED_TOKEN_*]` placeholders, like InternLM2's."""
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?", ",", ""])
        for _ in range(400)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=SPM_VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    # The converter's own ModelProto class, which also loads when sentencepiece and protobuf versions mismatch.
    model_proto = _spm_model_proto_class()
    proto = model_proto()
    proto.ParseFromString(model.getvalue())
    for i in range(len(CHAT_TOKENS)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"[UNUSED_TOKEN_{141 + i}]", 0.0
        piece.type = model_proto.SentencePiece.USER_DEFINED
    return proto


def internlm2_tokenizer_config(first_chat_id: int) -> dict:
    """tokenizer_config.json as InternLM2-chat ships it, chat tokens at the end of the vocabulary."""
    added = {0: "<unk>", 1: "<s>", 2: "</s>"} | {first_chat_id + i: token for i, token in enumerate(CHAT_TOKENS)}
    return {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for token_id, content in added.items()
        },
        "additional_special_tokens": list(reversed(CHAT_TOKENS)),
        "chat_template": INTERNLM2_CHAT_TEMPLATE,
    }


def write_tokenizer(folder, add_dummy_prefix=True) -> spm.SentencePieceProcessor:
    proto = train_internlm2_like_spm(add_dummy_prefix)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = internlm2_tokenizer_config(first_chat_id=len(proto.pieces) - len(CHAT_TOKENS))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


# ---------------------------------------------------------------------------------------------- file tests


def write_internlm2_folder(folder, config, state, weights_format):
    """An InternLM2 HF folder: config.json, weights (2 safetensors shards + index, or one .bin), tokenizer."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 127]}))
    state = {**state, "model.layers.0.attention.rotary_emb.inv_freq": torch.ones(8)}
    if weights_format == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for filename, shard_names in shards.items():
            save_file({name: state[name].contiguous() for name in shard_names}, folder / filename)
        weight_map = {name: filename for filename, shard_names in shards.items() for name in shard_names}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(folder)


@pytest.mark.parametrize(
    ("weights_format", "overrides"),
    [("safetensors", {}), ("bin", {"tie_word_embeddings": True, "num_key_value_heads": 1})],
    ids=["safetensors-shards", "bin-tied"],
)
def test_checkpoint_round_trip(tmp_path, weights_format, overrides):
    config = internlm2_config(**overrides)
    state = random_internlm2_state_dict(config)
    src = tmp_path / "internlm2"
    write_internlm2_folder(src, config, state, weights_format)

    assert convert_internlm2_checkpoint(src, tmp_path / "llama") == tmp_path / "llama"
    assert main([str(src), str(tmp_path / "llama-cli")]) == 0
    input_ids = random_input_ids(config)
    expected = internlm2_reference_logits(state, config, input_ids)
    for dst in (tmp_path / "llama", tmp_path / "llama-cli"):
        assert json.loads((dst / "config.json").read_text())["model_type"] == "llama"
        model = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
        assert type(model).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(llama_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
        assert model.generation_config.eos_token_id == [2, 127]
        tokenizer = AutoTokenizer.from_pretrained(dst)
        assert tokenizer.convert_tokens_to_ids("<|im_start|>") == IM_START_ID
        assert tokenizer.chat_template == INTERNLM2_CHAT_TEMPLATE


def test_cli_dtype_casts_weights(tmp_path):
    config = internlm2_config()
    src = tmp_path / "internlm2"
    write_internlm2_folder(src, config, random_internlm2_state_dict(config), "safetensors")
    convert_internlm2_checkpoint(src, tmp_path / "fp32")
    assert main([str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0

    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").state_dict()
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").state_dict()
    assert bf16["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16
    assert all(torch.equal(bf16[name], fp32[name].to(torch.bfloat16)) for name in fp32)


def test_cli_rejects_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_rejects_other_model_type(tmp_path, capsys):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(internlm2_config(model_type="llama")))
    with pytest.raises(SystemExit):
        main([str(src), str(tmp_path / "out")])
    assert "'internlm2'" in capsys.readouterr().err


def test_checkpoint_with_unknown_key_is_rejected(tmp_path):
    config = internlm2_config()
    state = random_internlm2_state_dict(config) | {"model.vision_proj.weight": torch.zeros(2, 2)}
    write_internlm2_folder(tmp_path / "src", config, state, "safetensors")
    with pytest.raises(ValueError, match=r"model\.vision_proj\.weight"):
        convert_internlm2_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# ----------------------------------------------------------------------------------------- tokenizer tests

TEXTS = (
    "the protein fold",
    "Kinase binding site with ATP 1999, 42x!",
    "  leading and trailing spaces  ",
    "héllo 🙂 wörld\nnew  line\ttab",
    "\n\n",
    "",
)


@pytest.mark.parametrize("add_dummy_prefix", [True, False], ids=["dummy-prefix", "no-dummy-prefix"])
def test_tokenizer_matches_sentencepiece(tmp_path, add_dummy_prefix):
    sp = write_tokenizer(tmp_path, add_dummy_prefix)
    tokenizer = convert_internlm2_tokenizer(tmp_path, tmp_path / "out")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "out")

    for text in TEXTS:
        expected = sp.encode(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text
        assert reloaded(text, add_special_tokens=False)["input_ids"] == expected, text
        assert tokenizer(text)["input_ids"] == [1, *expected], text
        assert tokenizer.decode(expected) == sp.decode(expected), text


def test_tokenizer_pinned_ids(tmp_path):
    write_tokenizer(tmp_path)
    tokenizer = convert_internlm2_tokenizer(tmp_path)
    # Byte fallback: "é" is bytes C3 A9, which sit at 3 + byte value after <unk>, <s>, </s>.
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [364, 3 + 0xC3, 3 + 0xA9]
    assert tokenizer.convert_ids_to_tokens([364, 3 + 0xC3]) == ["▁", "<0xC3>"]
    assert tokenizer("the protein fold")["input_ids"] == [1, 279, 292, 290]
    assert tokenizer.convert_ids_to_tokens([279, 292, 290]) == ["▁the", "▁protein", "▁fold"]


def test_tokenizer_chat_tokens_keep_their_ids(tmp_path):
    write_tokenizer(tmp_path)
    tokenizer = convert_internlm2_tokenizer(tmp_path)
    assert len(tokenizer) == SPM_VOCAB_SIZE + len(CHAT_TOKENS)
    expected_ids = {token: SPM_VOCAB_SIZE + i for i, token in enumerate(CHAT_TOKENS)}
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in CHAT_TOKENS} == expected_ids
    assert tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"] == [IM_START_ID]
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [IM_END_ID]
    ids = tokenizer("<|im_start|>user\nthe<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_ID and ids[-1] == IM_END_ID
    assert ids.count(IM_START_ID) == ids.count(IM_END_ID) == 1
    special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id)
    assert special_ids == (1, 2, 0, 2)


def test_chat_template_renders_internlm2_chatml(tmp_path):
    write_tokenizer(tmp_path)
    tokenizer = convert_internlm2_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "You fold proteins."}, {"role": "user", "content": "Fold MKV."}]

    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<s><|im_start|>system\nYou fold proteins.<|im_end|>\n"
        "<|im_start|>user\nFold MKV.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages[1:], tokenize=False) == "<s><|im_start|>user\nFold MKV.<|im_end|>\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(IM_START_ID) == 3
