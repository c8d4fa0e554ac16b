"""Scoring multiple-choice prompts: the log-probability of each option's number, or free generation.

`loglik` reads only the answer labels: after the prompt (which ends "The correct option is:"), option n
scores

    log P(label tokens of " n" | prompt) + log P(the next token does not start with a digit | prompt, " n").

Why the second term: option numbers are prefixes of each other, so the bare label probability P(" 1")
also counts every " 10", " 11", ... continuation and is always >= P(" 10"). Times P(no further digit) it
is the probability that the number the model writes is exactly n, which is what the official parser
(first integer of the output) reads. Scoring label + one terminator instead would have to pick a
terminator ("." or newline or end of text) that the prompt does not fix.

The fast path (`score_options`) runs ONE forward over each prompt (a left-padded batch of prompts),
keeps its KV cache, then scores every option of every prompt in ONE more forward on top of that cache:
each prompt's options are laid side by side in a block, and a 4D attention mask lets each option's
tokens see the prompt and the earlier tokens of the same option only. The token prefix that all prompts
of a call share (the official instruction is ~75 tokens of a ~260-token ProteinLMBench prompt) runs
once per call and its cache is copied into each batch. `score_options_reference` does one full forward
per option, no cache, no padding; tests hold the two equal.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import BatchEncoding

from ..loading import GREEDY_BELOW, LoadedModel
from .benchmarks import ANSWER_ANCHOR

_BYTE_DIGIT = re.compile(r"^<0x3[0-9]>$")  # SentencePiece byte-fallback pieces for "0".."9"
MASKABLE_ATTENTION = ("eager", "sdpa")


def label_token_ids(tokenizer, number: int) -> list[int]:
    """Token ids of " {number}" as they follow the prompt's final "The correct option is:".

    Tokenized in context and cut after the anchor, so tokenizers that treat a leading space specially
    (SentencePiece) give the ids the model really sees after the prompt.
    """
    anchor = tokenizer(ANSWER_ANCHOR, add_special_tokens=False)["input_ids"]
    full = tokenizer(f"{ANSWER_ANCHOR} {number}", add_special_tokens=False)["input_ids"]
    if full[: len(anchor)] != anchor or len(full) == len(anchor):
        raise ValueError(
            f"the tokenizer merges the option number {number} into the prompt's last token "
            f"({anchor[-3:]} → {full[-4:]}); its label cannot be scored as a continuation"
        )
    return full[len(anchor) :]


def digit_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: tokens whose text starts with a digit, i.e. that would extend a number."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    for token_id, piece in enumerate(pieces):
        # Raw pieces keep their word-boundary marker ("Ġ1", "▁1"), so " 1" never counts as extending a number.
        if piece and (piece[0] in "0123456789" or _BYTE_DIGIT.match(piece)):
            mask[token_id] = True
    return mask


def _vocab_size(arm: LoadedModel) -> int:
    return arm.model.get_output_embeddings().weight.shape[0]


def _length_order(texts: Sequence[str]) -> list[int]:
    # Similar lengths share a batch, so little compute goes to padding; stable, so runs repeat exactly.
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) bool "may attend" → additive 4D mask (B, 1, Q, K) for eager and sdpa attention."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


@dataclass
class SharedPrefix:
    """Tokens every prompt of a run starts with (the official instruction, a chat header), run once.

    `cache` holds their keys and values for one row; each batch copies it out to its rows.
    """

    length: int
    cache: object


MIN_SHARED_PREFIX = 8  # below this, copying the cache costs about what it saves


@torch.no_grad()
def shared_prefix(arm: LoadedModel, encodings: Sequence[BatchEncoding]) -> SharedPrefix | None:
    """The longest token prefix common to every prompt (stopping before any protein placeholder and
    leaving each prompt at least one token of its own), run through the model once; None if short."""
    rows = [ids[mask.bool()].tolist() for e in encodings for ids, mask in zip(e["input_ids"], e["attention_mask"])]
    if len(rows) < 2:
        return None
    length = min(len(row) for row in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    if arm.multimodal and arm.processor.protein_token_id in first[:length]:
        length = first.index(arm.processor.protein_token_id)
    if length < MIN_SHARED_PREFIX:
        return None
    ids = torch.tensor([first[:length]], device=arm.device)
    return SharedPrefix(length, arm.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache)


def _run_prompts(arm: LoadedModel, encoding: BatchEncoding, prefix: SharedPrefix | None):
    """Forward the prompts of a left-padded batch; returns (output with cache, context mask (B, C)).

    Without a prefix: a plain forward, C = P. With one: only the tokens after the shared prefix run, on a
    copy of its cache; C = prefix + suffix columns. Either way the context mask marks real tokens.
    """
    mask = encoding["attention_mask"]  # (B, P)
    real_index = mask.cumsum(-1) - 1  # each token's position in its own prompt
    if prefix is None:
        out = arm.model(**encoding, position_ids=real_index.clamp(min=0), use_cache=True, logits_to_keep=1)
        return out, mask
    shared = prefix.length
    batch = mask.shape[0]
    # Left padding right-aligns the prompts, so every suffix lies in columns [shared:]; the columns there
    # that hold a shorter prompt's padding or prefix tokens are masked out.
    suffix_mask = (mask.bool() & (real_index >= shared))[:, shared:]  # (B, L)
    suffix_length = suffix_mask.shape[1]
    causal = torch.ones(suffix_length, suffix_length, dtype=torch.bool, device=mask.device).tril()
    visible = torch.cat(
        [
            torch.ones(batch, suffix_length, shared, dtype=torch.bool, device=mask.device),
            causal[None] & suffix_mask[:, None, :],
        ],
        dim=-1,
    )  # (B, L, shared + L)
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(batch)
    extra = {k: v for k, v in encoding.items() if k not in ("input_ids", "attention_mask")}
    out = arm.model(
        input_ids=encoding["input_ids"][:, shared:],
        attention_mask=_additive_mask(visible, _dtype(arm)),
        position_ids=real_index[:, shared:].clamp(min=0),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )
    context = torch.cat([torch.ones(batch, shared, dtype=mask.dtype, device=mask.device), suffix_mask.to(mask.dtype)], 1)
    return out, context


def _dtype(arm: LoadedModel) -> torch.dtype:
    return arm.model.get_output_embeddings().weight.dtype


@torch.no_grad()
def _score_batch(
    arm: LoadedModel,
    encoding: BatchEncoding,
    option_tokens: list[list[list[int]]],
    digit_mask: torch.Tensor | None,
    prefix: SharedPrefix | None,
    per_token: bool = False,
) -> list[list[float]]:
    """Scores of each row's options (token lists) on top of its prompt. With `digit_mask`, each score adds
    log P(next token is not a digit) after the option; with `per_token`, scores are means over its tokens."""
    prompt_out, context_mask = _run_prompts(arm, encoding, prefix)  # context_mask: (B, C)
    first_logp = prompt_out.logits[:, -1].float().log_softmax(-1)  # (B, V)
    device = context_mask.device

    # The block: for each prompt, option 1's label tokens, then option 2's, ...; right padded to T.
    # `owner` says which option (from 1; 0 = padding) each block token belongs to.
    id_rows, offset_rows, owner_rows, spans = [], [], [], []
    for row_options in option_tokens:
        ids, offsets, owner, row_spans = [], [], [], []
        for n, tokens in enumerate(row_options, start=1):
            row_spans.append((len(ids), tokens))
            ids += tokens
            offsets += range(len(tokens))
            owner += [n] * len(tokens)
        id_rows.append(ids)
        offset_rows.append(offsets)
        owner_rows.append(owner)
        spans.append(row_spans)
    block_length = max(len(ids) for ids in id_rows)
    pad = [block_length - len(ids) for ids in id_rows]
    block_ids = torch.tensor([ids + [0] * p for ids, p in zip(id_rows, pad)], device=device)  # (B, T)
    offsets = torch.tensor([o + [0] * p for o, p in zip(offset_rows, pad)], device=device)
    owner = torch.tensor([o + [0] * p for o, p in zip(owner_rows, pad)], device=device)
    causal = torch.ones(block_length, block_length, dtype=torch.bool, device=device).tril()
    same_option = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] > 0)
    eye = torch.eye(block_length, dtype=torch.bool, device=device)
    allowed = (same_option & causal) | eye  # (B, T, T); padding rows see themselves
    visible = torch.cat([context_mask.bool()[:, None, :].expand(-1, block_length, -1), allowed], dim=-1)
    block_out = arm.model(
        input_ids=block_ids,
        attention_mask=_additive_mask(visible, _dtype(arm)),
        position_ids=context_mask.sum(-1, keepdim=True) + offsets,  # each prompt's positions continue
        cache=prompt_out.cache,
    )
    block_logp = block_out.logits.float().log_softmax(-1)  # (B, T, V)
    if digit_mask is not None:
        not_digit_logp = block_logp.masked_fill(digit_mask.to(device), float("-inf")).logsumexp(-1).tolist()  # (B, T)
    # log P(each block token | what precedes it): an option's first token is predicted by the prompt's last
    # position, every later one by the block position before it.
    after_prompt = first_logp.gather(-1, block_ids)  # (B, T)
    after_block = block_logp[:, :-1].gather(-1, block_ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
    token_logp = torch.where(offsets == 0, after_prompt, torch.cat([after_prompt[:, :1], after_block], 1))

    token_logp = token_logp.tolist()
    scores = []
    for row, row_spans in enumerate(spans):
        row_scores = []
        for start, ids in row_spans:
            score = sum(token_logp[row][start : start + len(ids)])
            if digit_mask is not None:
                score += not_digit_logp[row][start + len(ids) - 1]
            row_scores.append(score / len(ids) if per_token else score)
        scores.append(row_scores)
    return scores


def score_options(
    arm: LoadedModel,
    texts: Sequence[str],
    num_options: Sequence[int],
    add_special_tokens: bool = True,
    batch_size: int = 8,
    progress: bool = False,
    share_prefix: bool = True,
) -> list[list[float]]:
    """Log-probability of each option number after each prompt: one list of `num_options[i]` per text.

    `batch_size` prompts per forward; each prompt runs once (its shared prefix once per call when
    `share_prefix`), then one more forward scores all options of the batch. Needs eager or sdpa
    attention (the option block uses a custom 4D mask).
    """
    if len(texts) != len(num_options):
        raise ValueError(f"got {len(texts)} texts but {len(num_options)} option counts")
    implementation = arm.decoder_config._attn_implementation
    if implementation not in MASKABLE_ATTENTION:
        raise ValueError(
            f"loglik scoring needs attention with custom masks ({MASKABLE_ATTENTION}), but {arm.name} uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'"
        )
    labels = {n: label_token_ids(arm.tokenizer, n) for n in range(1, max(num_options, default=0) + 1)}
    digit_mask = digit_token_mask(arm.tokenizer, _vocab_size(arm))
    order = _length_order(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    encodings = [arm.encode([texts[i] for i in batch], add_special_tokens) for batch in batches]
    prefix = shared_prefix(arm, encodings) if share_prefix else None
    scores: list[list[float] | None] = [None] * len(texts)
    for batch, encoding in tqdm(list(zip(batches, encodings)), desc=f"{arm.name} loglik", disable=not progress):
        option_tokens = [[labels[n] for n in range(1, num_options[i] + 1)] for i in batch]
        batch_scores = _score_batch(arm, encoding, option_tokens, digit_mask, prefix)
        for index, row_scores in zip(batch, batch_scores):
            scores[index] = row_scores
    return scores


def score_continuations(
    arm: LoadedModel,
    texts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    add_special_tokens: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[float]]:
    """Mean log-probability per token of each candidate continuation after its prompt (the option TEXT, not
    its number): how likely the model finds each description of the protein as its reply.

    Same machinery as `score_options`: each prompt runs once, then one forward scores every candidate on top
    of its cache. The mean (not the sum) keeps longer descriptions from losing for their length alone.
    """
    if len(texts) != len(continuations):
        raise ValueError(f"got {len(texts)} texts but {len(continuations)} continuation lists")
    implementation = arm.decoder_config._attn_implementation
    if implementation not in MASKABLE_ATTENTION:
        raise ValueError(f"description scoring needs sdpa or eager attention, but {arm.name} uses {implementation!r}")
    order = _length_order(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    encodings = [arm.encode([texts[i] for i in batch], add_special_tokens) for batch in batches]
    prefix = shared_prefix(arm, encodings)
    scores: list[list[float] | None] = [None] * len(texts)
    for batch, encoding in tqdm(list(zip(batches, encodings)), desc=f"{arm.name} description", disable=not progress):
        option_tokens = [
            [arm.tokenizer(option, add_special_tokens=False)["input_ids"] for option in continuations[i]] for i in batch
        ]
        if any(not tokens for row in option_tokens for tokens in row):
            raise ValueError("an option text tokenizes to nothing; it cannot be scored")
        batch_scores = _score_batch(arm, encoding, option_tokens, None, prefix, per_token=True)
        for index, row_scores in zip(batch, batch_scores):
            scores[index] = row_scores
    return scores


@torch.no_grad()
def score_options_reference(arm: LoadedModel, text: str, num_options: int, add_special_tokens: bool = True) -> list[float]:
    """The same scores as `score_options`, the slow obvious way: one full forward per option."""
    digit_mask = digit_token_mask(arm.tokenizer, _vocab_size(arm)).to(arm.device)
    encoding = arm.encode([text], add_special_tokens)
    prompt_ids = encoding.pop("input_ids")  # (1, P), no padding for a single text
    encoding.pop("attention_mask")
    scores = []
    for n in range(1, num_options + 1):
        ids = label_token_ids(arm.tokenizer, n)
        input_ids = torch.cat([prompt_ids, torch.tensor([ids], device=prompt_ids.device)], dim=1)
        logp = arm.model(input_ids=input_ids, **encoding).logits[0].float().log_softmax(-1)  # (P + L, V)
        last_prompt = prompt_ids.shape[1] - 1
        score = sum(float(logp[last_prompt + i, token]) for i, token in enumerate(ids))
        score += float(logp[last_prompt + len(ids)].masked_fill(digit_mask, float("-inf")).logsumexp(-1))
        scores.append(score)
    return scores


def option_probabilities(scores: Sequence[float]) -> list[float]:
    """Scores renormalised over the item's options (a softmax)."""
    return torch.tensor(scores, dtype=torch.float64).softmax(-1).tolist()


@torch.no_grad()
def generate_answers(
    arm: LoadedModel,
    texts: Sequence[str],
    add_special_tokens: bool = True,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """The text each prompt generates (prompt removed). Greedy when `temperature` is 0; otherwise sampled
    at that temperature, seeded per batch from `seed` so a rerun gives the same outputs."""
    # The settings and stops of every other generating path (`LoadedModel.generation_options`): without the
    # end-of-turn stop a chat model's answer runs on past its turn into whatever it would say next.
    if temperature >= GREEDY_BELOW:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        sampling = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    order = _length_order(texts)
    outputs: list[str | None] = [None] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch_index, batch in enumerate(tqdm(batches, desc=f"{arm.name} generate", disable=not progress)):
        encoding = arm.encode([texts[i] for i in batch], add_special_tokens)
        torch.manual_seed(seed + batch_index)
        generated = arm.model.generate(
            **encoding, max_new_tokens=max_new_tokens, **sampling, **arm.generation_options()
        )
        new_tokens = generated[:, encoding["input_ids"].shape[1] :].tolist()  # (B, new)
        for index, tokens in zip(batch, new_tokens):
            outputs[index] = arm.reply_text(tokens)
    return outputs


__all__ = [
    "digit_token_mask",
    "generate_answers",
    "label_token_ids",
    "option_probabilities",
    "score_options",
    "score_options_reference",
    "shared_prefix",
]
