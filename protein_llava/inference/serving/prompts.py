"""Prompts as the model sees them: decoder token ids with `<protein>` placeholders, plus the residues.

A client sends text or token ids with proteins inline as `<seq> M K T … </seq>`. The model never sees the
residue letters as text: each span becomes the processor's run of placeholder tokens. `PreparedPrompt`
keeps, for every token the client sent, the position of that same token in the model's input (or None
where the client's token lies in or against a protein span), so `echo` + `logprobs` can answer in the
client's own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...sequences import ProteinSequenceError, SequenceReason, find_seq_spans


class PromptError(ValueError):
    """A prompt the server cannot use; `reason` is the code clients see, the message names where."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreparedPrompt:
    """One prompt ready for the model.

    input_ids: decoder ids, placeholders in place of each protein span.
    proteins: the residues of each span, in order (one placeholder run each).
    client_ids: the tokens as the client sent them (or as its text tokenized); None for chat prompts.
    client_offsets: character offset of each client token in `client_text`.
    client_text: the client's prompt text (its ids decoded).
    positions: for each client token, its index in `input_ids`, or None inside / against a protein span.
    """

    input_ids: list[int]
    proteins: list[str]
    client_ids: list[int] | None = None
    client_offsets: list[int] | None = None
    client_text: str | None = None
    positions: list[int | None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def prepare_rendered_prompt(processor, text: str, record: str, proteins: list[str] | None = None) -> PreparedPrompt:
    """A rendered chat prompt (BOS already placed by the template) through the processor; `proteins`: the
    residues of its `<protein>` markers (None: proteins inline as `<seq> ... </seq>`)."""
    try:
        expanded, proteins = processor.expand_proteins(text, proteins, record=record)
    except ProteinSequenceError as error:
        raise PromptError(str(error.reason), str(error)) from error
    ids = processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    processor.check_placeholder_counts([ids], [expanded])  # the processor's own guard, as for any batch
    return PreparedPrompt(input_ids=list(ids), proteins=proteins)


def prepare_text_prompt(processor, text: str, record: str) -> PreparedPrompt:
    """A completions prompt given as text: tokenized as a plain string (special tokens added, as vLLM
    does), then handled exactly like token ids, so both forms of one prompt give one model input."""
    if processor.protein_token in text:
        raise PromptError(
            str(SequenceReason.BAD_MARKUP),  # the processor's code for the same fault
            f"{record} contains {processor.protein_token!r} literally; write proteins as <seq> ... </seq>",
        )
    ids = processor.tokenizer(text, add_special_tokens=True)["input_ids"]
    return prepare_token_prompt(processor, ids, record)


def prepare_token_prompt(processor, client_ids: Sequence[int], record: str) -> PreparedPrompt:
    """Token ids from the client (as lm-eval's `local-completions` sends them) → the model's input.

    Tokens wholly before the first protein span and wholly after the last one are kept as sent; the
    stretch from the first token touching a span to the last one is decoded and re-tokenized by the
    processor (placeholders in place of residues), exactly as a text prompt would be.
    """
    tokenizer = processor.tokenizer
    vocab_size = len(tokenizer)
    if not client_ids:
        raise PromptError("empty_prompt", f"{record} has no tokens")
    for index, token in enumerate(client_ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise PromptError(
                "token_out_of_range", f"{record} token {index} is {token!r}; token ids run from 0 to {vocab_size - 1}"
            )
        if token == processor.protein_token_id:
            raise PromptError(
                str(SequenceReason.BAD_MARKUP),
                f"{record} token {index} is the {processor.protein_token} placeholder; write proteins as <seq> ... </seq>",
            )
    client_ids = list(client_ids)
    text, offsets = decode_with_offsets(tokenizer, client_ids)
    try:
        spans = find_seq_spans(text, record)
    except ProteinSequenceError as error:
        raise PromptError(str(error.reason), str(error)) from error
    if not spans:
        return PreparedPrompt(client_ids, [], client_ids, offsets, text, list(range(len(client_ids))))
    ends = offsets[1:] + [len(text)]
    first_touching = next(i for i, end in enumerate(ends) if end > spans[0].start)
    after_last = next((i for i, start in enumerate(offsets) if start >= spans[-1].end), len(client_ids))
    middle = text[offsets[first_touching] : offsets[after_last] if after_last < len(client_ids) else len(text)]
    middle_prompt = prepare_rendered_prompt(processor, middle, record)
    input_ids = client_ids[:first_touching] + middle_prompt.input_ids + client_ids[after_last:]
    shift = first_touching + len(middle_prompt.input_ids) - after_last
    positions = [
        index if index < first_touching else None if index < after_last else index + shift
        for index in range(len(client_ids))
    ]
    return PreparedPrompt(input_ids, middle_prompt.proteins, client_ids, offsets, text, positions)


def decode_with_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The ids decoded as one text, and each token's start offset in it.

    Tokens are decoded one by one; where that does not add up to the whole text (a character split over
    byte-level tokens), offsets come from decoding each prefix instead.
    """
    options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    text = tokenizer.decode(ids, **options)
    pieces = [tokenizer.decode([token], **options) for token in ids]
    if "".join(pieces) == text:
        offsets, cursor = [], 0
        for piece in pieces:
            offsets.append(cursor)
            cursor += len(piece)
        return text, offsets
    offsets = [0] + [len(tokenizer.decode(ids[:end], **options)) for end in range(1, len(ids))]
    # A prefix that ends inside a character decodes to a replacement character; never point past the text.
    return text, [min(offset, len(text)) for offset in offsets]
