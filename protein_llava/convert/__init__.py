"""Checkpoint converters that rewrite third-party checkpoints into native transformers layouts.

- `protein_llava.convert.internlm2`: InternLM2 (e.g. internlm/internlm2-chat-7b) -> `LlamaForCausalLM`,
  with its SentencePiece tokenizer as a fast tokenizer carrying InternLM2's ChatML template.
  CLI: `python -m protein_llava.convert.internlm2 SRC DST [--dtype bfloat16]`.

Import from the submodule (`from protein_llava.convert.internlm2 import ...`): re-exporting it here would
import it before `python -m` runs it, which makes runpy warn about a double import.
"""
