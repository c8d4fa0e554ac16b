"""The protein encoder: fair-esm's own `ESM2`, returning per-residue representations of one layer."""

from __future__ import annotations

import contextlib

import esm
import torch
from esm.model.esm2 import ESM2
from torch import nn

from .configuration import ProteinEncoderConfig


def esm2_alphabet() -> esm.data.Alphabet:
    """The alphabet every ESM-2 checkpoint uses (fair-esm's "ESM-1b" vocabulary, 33 tokens)."""
    return esm.data.Alphabet.from_architecture("ESM-1b")


class ProteinEncoder(nn.Module):
    """fair-esm ESM2 plus the choice of representation layer.

    Input: ESM token ids (N, T) as the processor builds them: `<cls>` residues `<eos>` then `<pad>`.
    Output: residue features (N, T - 2, D) aligned left, and a mask (N, T - 2) True on residues.
    """

    def __init__(self, config: ProteinEncoderConfig):
        super().__init__()
        self.config = config
        alphabet = esm2_alphabet()
        self.esm = ESM2(
            num_layers=config.num_layers,
            embed_dim=config.embed_dim,
            attention_heads=config.attention_heads,
            alphabet=alphabet,
            token_dropout=config.token_dropout,
        )
        self.repr_layer = config.resolved_repr_layer
        self.padding_idx = alphabet.padding_idx
        self.cls_idx = alphabet.cls_idx
        self.eos_idx = alphabet.eos_idx

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        by_layer, residue_mask = self.layer_representations(tokens, [self.repr_layer])
        return by_layer[self.repr_layer], residue_mask

    def layer_representations(self, tokens: torch.Tensor, layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Residue features of each of `layers` (fair-esm indices, 0 = embeddings) from one pass, and the mask."""
        # A frozen encoder keeps no activations for backward: stage 1 and default stage 2 save its memory.
        trainable = any(p.requires_grad for p in self.esm.parameters())
        # fair-esm keeps its rotary tables in fp32, so with bf16/fp16 weights q and k are promoted to fp32 while v
        # is not, and its attention matmul refuses the mix. Autocast at the weights' dtype (what training runs
        # under anyway) makes them agree; inference outside autocast needs it too.
        dtype = self.esm.embed_tokens.weight.dtype
        low_precision = dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(tokens.device.type)
        autocast = torch.autocast(tokens.device.type, dtype=dtype) if low_precision else contextlib.nullcontext()
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()), autocast:
            representations = self.esm(tokens, repr_layers=list(layers))["representations"]
        # Residues sit at positions 1..L of each row: drop <cls> in front and keep the longest row's span.
        residue_mask = (tokens != self.padding_idx) & (tokens != self.cls_idx) & (tokens != self.eos_idx)
        span = tokens.shape[1] - 2
        return {layer: representations[layer][:, 1 : 1 + span] for layer in layers}, residue_mask[:, 1 : 1 + span]
