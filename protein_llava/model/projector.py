"""Projector: per-residue ESM features → LLM input embeddings, with optional token reduction.

Token reduction runs first, in the encoder's width (cheap), then the projection to the decoder's width.
The number of output tokens per protein is `configuration.num_protein_tokens(length, config)`.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import ProjectorConfig


def build_projection(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """The feature projection named by `projector_type`."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    if projector_type == "mlp2x_gelu":
        # LLaVA-1.5's projector: linear → GELU → linear.
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector type {projector_type!r}")


def strided_mean_pool(features: torch.Tensor, mask: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over consecutive windows of `stride` residues; a final partial window averages what it has.

    features: (N, T, D) with mask (N, T) True on residues (left-aligned, as the encoder returns them).
    Returns (N, ceil(T / stride), D) and its mask, True where a window holds at least one residue.
    """
    n, t, d = features.shape
    windows = -(-t // stride)
    pad = windows * stride - t
    weights = mask.to(features.dtype)
    summed = nn.functional.pad(features * weights.unsqueeze(-1), (0, 0, 0, pad)).view(n, windows, stride, d).sum(2)
    counts = nn.functional.pad(weights, (0, pad)).view(n, windows, stride).sum(2)  # (N, windows)
    pooled = summed / counts.clamp(min=1).unsqueeze(-1)
    return pooled, counts > 0


class Resampler(nn.Module):
    """`num_latents` learned queries cross-attend to a protein's residues: a fixed token budget per protein."""

    def __init__(self, dim: int, num_latents: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"resampler: encoder width {dim} is not divisible by resampler_heads={num_heads}")
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim**-0.5)
        self.norm_features = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.feed_forward = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = features.shape[0]
        queries = self.norm_latents(self.latents).unsqueeze(0).expand(n, -1, -1)  # (N, L, D)
        keys = self.norm_features(features)
        attended, _ = self.attention(queries, keys, keys, key_padding_mask=~mask, need_weights=False)
        latents = self.latents + attended
        latents = latents + self.feed_forward(latents)
        return latents, torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T, D) features, (N, T) mask → (N, D): the mean over each protein's residues."""
    weights = mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(1) / weights.sum(1).clamp(min=1)


class ProteinProjector(nn.Module):
    """Token reduction (none / mean_pool / resampler) followed by the projection to the decoder's width.

    Optionally a summary token first (the projection of the protein's mean feature, by its own projection,
    optionally standardised with the training proteins' statistics) and an RMS norm with a learned gain on
    every output token (see `ProjectorConfig`).
    """

    def __init__(self, config: ProjectorConfig, encoder_dim: int, text_dim: int):
        super().__init__()
        self.config = config
        self.resampler = (
            Resampler(encoder_dim, config.num_latents, config.resampler_heads)
            if config.token_reduction == "resampler"
            else None
        )
        self.projection = build_projection(config.projector_type, encoder_dim, text_dim)
        self.summary_projection = (
            build_projection(config.projector_type, encoder_dim, text_dim) if config.summary_token else None
        )
        if config.summary_standardize:
            # Fitted from the training proteins before stage 1 (`training.alignment.fit_summary_statistics`);
            # saved with the projector's weights. Identity until then.
            self.register_buffer("summary_center", torch.zeros(encoder_dim))
            self.register_buffer("summary_scale", torch.ones(encoder_dim))
        # eps far below the pre-norm scale: std-0.02 initial weights give tokens of RMS ~1e-3.
        self.output_norm = nn.RMSNorm(text_dim, eps=1e-10) if config.output_norm == "rms" else None

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, D_enc) residue features and mask → (N, T', D_text) protein tokens and their mask."""
        summary = masked_mean(features, mask) if self.summary_projection is not None else None  # (N, D_enc)
        if summary is not None and self.config.summary_standardize:
            summary = (summary - self.summary_center.to(summary.dtype)) / self.summary_scale.to(summary.dtype)
        reduction = self.config.token_reduction
        if reduction == "mean_pool":
            features, mask = strided_mean_pool(features, mask, self.config.pool_stride)
        elif reduction == "resampler":
            features, mask = self.resampler(features, mask)
        elif reduction == "mean":
            features, mask = masked_mean(features, mask).unsqueeze(1), mask.new_ones(mask.shape[0], 1)
        elif reduction != "none":
            raise ValueError(f"unknown token_reduction {reduction!r}")
        tokens = self.projection(features)
        if summary is not None:
            # The summary token leads each protein's run; valid rows stay left-aligned for the splice.
            tokens = torch.cat([self.summary_projection(summary).unsqueeze(1), tokens], dim=1)
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        if self.output_norm is not None:
            # In float32 (the gain's dtype) whatever autocast made of the projection: an exact norm, and
            # torch's fused kernel needs input and weight of one dtype.
            tokens = self.output_norm(tokens.to(self.output_norm.weight.dtype))
        return tokens, mask
