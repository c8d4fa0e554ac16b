"""A byte-level BPE tokenizer with no merges: a real `tokenizers` tokenizer that needs no training or files.

The `tiny` preset uses it so tests and `model=tiny` runs have a deterministic tokenizer on any machine.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# ChatML, the conversation format of SmolLM2 and InternLM2 (without any BOS token).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BYTE_TOKENIZER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens after 4 specials (ids 0-3): `<|endoftext|>` (eos), `<|im_start|>`, `<|im_end|>`, `<pad>`."""
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {token: index for index, token in enumerate(BYTE_TOKENIZER_SPECIALS)}
    vocab.update({ch: len(BYTE_TOKENIZER_SPECIALS) + i for i, ch in enumerate(byte_alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to `char` (printable bytes map to themselves)."""
    code = ord(char)
    if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
        return code
    # The remaining bytes were shifted to 256 + their rank among non-printable bytes.
    non_printable = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return non_printable[code - 256]
