"""Causal-LM loss without materialising full-vocabulary logits for a whole batch.

InternLM2's head has 92,544 outputs: fp32 logits for one packed 8k-token row take 3 GB, plus as much again
for their gradient. `chunked_cross_entropy` computes the cross-entropy over supervised positions only, a
chunk at a time, recomputing each chunk's logits in the backward pass instead of keeping them.
`chunked_causal_lm_forward` is a transformers causal LM's forward with that loss in place of its logits,
as litgpt's `lm_head_chunk_size`: `ProteinLLM.forward(..., loss_chunk_size=N)` calls it, and so does the
text-only arm's bare decoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..constants import IGNORE_INDEX


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab): the only logits alive at a time
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden_states: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != IGNORE_INDEX, as transformers' causal-LM loss computes it.

    hidden_states: (B, T, H); labels: (B, T), unshifted (position t is predicted from t - 1).
    """
    if chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])  # (B*(T-1), H)
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]  # (N, H), (N,): supervised positions only
    if targets.numel() == 0:
        return hidden_states.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss_sum, head, hidden[chunk], targets[chunk], use_reentrant=False)
    return total / targets.numel()


def chunked_causal_lm_forward(
    decoder: nn.Module, labels: torch.Tensor, chunk_size: int, **inputs
) -> CausalLMOutputWithPast:
    """`decoder(**inputs, labels=labels)` with the chunked loss: its body, then the head a chunk at a time.

    `decoder` is a transformers causal LM, bare or peft-wrapped (peft forwards `get_decoder` and
    `get_output_embeddings` to the model it wraps, whose layers carry the adapters). The output holds the
    loss only: no full logits are kept, which is the point.
    """
    inputs.pop("use_cache", None)
    inputs.pop("logits_to_keep", None)
    hidden = decoder.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    return CausalLMOutputWithPast(loss=chunked_cross_entropy(hidden, decoder.get_output_embeddings(), labels, chunk_size))


def chunked_cross_entropy_per_sample(
    hidden_states: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row next-token cross-entropy sums and supervised-token counts, (B,) each, a chunk at a time.

    Their totals give `chunked_cross_entropy`: sums.sum() / counts.sum() is the batch's mean loss.
    """
    if chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be >= 1, got {chunk_size}")
    batch, length, width = hidden_states.shape
    hidden = hidden_states[:, :-1].reshape(-1, width)
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    rows = torch.arange(batch, device=hidden.device).repeat_interleave(length - 1)
    keep = targets != IGNORE_INDEX
    hidden, targets, rows = hidden[keep], targets[keep], rows[keep]
    sums = hidden_states.new_zeros(batch, dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        losses = checkpoint(_chunk_losses, head, hidden[chunk], targets[chunk], use_reentrant=False)
        sums = sums.index_add(0, rows[chunk], losses)
    counts = torch.bincount(rows, minlength=batch).to(sums.dtype)
    return sums, counts


def _chunk_losses(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")
