"""Causal-LM loss without materialising full-vocabulary logits for a whole batch.

InternLM2's head has 92,544 outputs: fp32 logits for one packed 8k-token row take 3 GB, plus as much again
for their gradient. `chunked_causal_lm_loss` computes the cross-entropy over supervised positions only, a
chunk at a time, recomputing each chunk's logits in the backward pass instead of keeping them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .data.tokenize import IGNORE_INDEX
from .modeling import ProteinLLM


def split_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(transformer body, LM head) of a ProteinLLM's decoder or of a bare (possibly LoRA-wrapped) decoder."""
    decoder = model.language_model if isinstance(model, ProteinLLM) else model
    if hasattr(decoder, "get_base_model"):  # peft wrapper: LoRA layers live inside the base model
        decoder = decoder.get_base_model()
    return decoder.get_decoder(), decoder.get_output_embeddings()


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
        raise ValueError(f"loss chunk_size must be >= 1, got {chunk_size}")
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


def causal_lm_loss(model: nn.Module, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """The training loss of a batch: the decoder's own loss, or the chunked one when `chunk_size` is set."""
    if chunk_size is None:
        return model(**batch, use_cache=False).loss
    batch = dict(batch)
    labels = batch.pop("labels")
    body, head = split_decoder(model)
    if isinstance(model, ProteinLLM):
        inputs = {
            "inputs_embeds": model.embed_inputs(
                batch.pop("input_ids"),
                batch.pop("protein_input_ids", None),
                batch.pop("protein_representations", None),
                batch.pop("protein_representations_mask", None),
            )
        }
    else:
        inputs = {"input_ids": batch.pop("input_ids")}
    hidden = body(**inputs, **batch, use_cache=False).last_hidden_state
    return chunked_cross_entropy(hidden, head, labels, chunk_size)
