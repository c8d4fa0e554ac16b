"""Residue alignment: a warm start for the projector that gives protein tokens a meaning the decoder knows.

A randomly initialised projector hands the frozen decoder tokens it has never seen, and stage 1 must teach
it, through thirty frozen layers and from the few answer tokens that depend on the protein, what they mean.
At a CPU budget that does not happen (the protein-swapped accuracy stays where the true one is). But the
encoder's per-residue features hold each residue's identity (a linear probe reads it), and the decoder
already reads residues written as text: the text-only arm's " K", " E", ... tokens. So before stage 1 the
projector is fitted, with no decoder in the loop, to map each residue's features to the decoder's embedding
of that residue's letter token (for `mean_pool`, the mean over each window). The protein span then starts as
a soft transcription of the sequence, which the decoder can read from step 0, carrying the encoder's
context besides; stages 1 and 2 train on from there. The summary token, if any, is not aligned: it is the
protein's mean feature, and what it should say is left to training. With `summary_standardize` its input is
centred and scaled per dimension by the training proteins' statistics (`fit_summary_statistics`), so that
different proteins' summary tokens start apart rather than along the features' shared mean direction.

Cheap: the encoder runs once over the training proteins (frozen), then `steps` Adam steps of the projector
alone on minibatches of their features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.modeling import ProteinLLM
from ..model.projector import masked_mean, strided_mean_pool
from ..sequences import RESIDUES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignmentResult:
    """Mean squared error and mean cosine similarity of projector tokens to their targets, before and after."""

    mse_before: float
    mse_after: float
    cosine_before: float
    cosine_after: float
    steps: int


def residue_token_embeddings(model: ProteinLLM, tokenizer, alphabet: str = "".join(sorted(RESIDUES))) -> dict[str, torch.Tensor]:
    """{residue letter: the decoder's embedding of " X"}, the token the text-only arm reads for X (the mean
    embedding where a tokenizer splits it)."""
    embeddings = model.get_input_embeddings().weight.detach().float()
    table = {}
    for letter in alphabet:
        ids = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the decoder's tokenizer encodes residue {letter!r} as no token")
        table[letter] = embeddings[ids].mean(0)
    return table


def _residue_tokens(projector, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projector's tokens for the residues (the summary token, if any, left out) and their mask."""
    tokens, token_mask = projector(features, mask)
    if projector.summary_projection is not None:
        tokens, token_mask = tokens[:, 1:], token_mask[:, 1:]
    return tokens, token_mask


def _targets(proteins: Sequence[str], table: dict[str, torch.Tensor], width: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    dim = next(iter(table.values())).shape[0]
    targets = torch.zeros(len(proteins), width, dim)
    mask = torch.zeros(len(proteins), width, dtype=torch.bool)
    for row, residues in enumerate(proteins):
        targets[row, : len(residues)] = torch.stack([table[r] for r in residues])
        mask[row, : len(residues)] = True
    if config.token_reduction == "mean_pool":
        targets, mask = strided_mean_pool(targets, mask, config.pool_stride)
    return targets, mask


@dataclass(frozen=True)
class EncodedProteins:
    """The frozen encoder's residue features of a set of proteins, in chunks of `batch_size` (sorted order):
    one encoder pass shared by the summary statistics and the residue alignment."""

    chunks: tuple[tuple[tuple[str, ...], torch.Tensor, torch.Tensor], ...]
    """(proteins, features (n, T, D), mask (n, T)) per chunk."""

    @property
    def proteins(self) -> tuple[str, ...]:
        return tuple(p for chunk, _, _ in self.chunks for p in chunk)


@torch.no_grad()
def encode_proteins_frozen(model: ProteinLLM, processor, proteins: Sequence[str], batch_size: int = 32) -> EncodedProteins:
    """Run the encoder once over the distinct `proteins` (sorted), `batch_size` at a time, without gradients."""
    proteins = sorted(set(proteins))
    device = next(model.protein_encoder.parameters()).device
    chunks = []
    for start in range(0, len(proteins), batch_size):
        chunk = tuple(proteins[start : start + batch_size])
        features, mask = model.protein_encoder(processor.encode_proteins(list(chunk)).to(device))
        chunks.append((chunk, features, mask))
    return EncodedProteins(tuple(chunks))


def align_projector_to_residues(
    model: ProteinLLM,
    processor,
    proteins: Sequence[str],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    encoded: EncodedProteins | None = None,
) -> AlignmentResult:
    """Fit `model.projector` so each residue token ≈ the decoder's embedding of that residue's letter.

    The encoder is frozen and run once (or `encoded` is reused: it must hold exactly the distinct `proteins`;
    its chunks are the minibatches); only the projector changes. Needs `token_reduction` none or mean_pool
    (a resampler's or a mean's tokens stand for no residue in particular).
    """
    config = model.config.projector_config
    if config.token_reduction not in ("none", "mean_pool"):
        raise ValueError(
            f"residue alignment needs projector token_reduction none or mean_pool, got {config.token_reduction!r}: "
            "its tokens must stand for residues (set stage1.align_steps=0)"
        )
    if steps < 1:
        raise ValueError(f"align_steps must be >= 1, got {steps}")
    proteins = sorted(set(proteins))
    if not proteins:
        raise ValueError("residue alignment needs training proteins; the data holds none")
    table = residue_token_embeddings(model, processor.tokenizer)
    projector = model.projector
    projector_dtype = next(projector.parameters()).dtype
    if encoded is None:
        encoded = encode_proteins_frozen(model, processor, proteins, batch_size)
    elif encoded.proteins != tuple(proteins):
        raise ValueError("residue alignment: `encoded` holds other proteins than the ones to align")
    # (features, mask, targets, target mask) per chunk of proteins.
    chunks = []
    for chunk, features, mask in encoded.chunks:
        targets, target_mask = _targets(chunk, table, features.shape[1], config)
        chunks.append((features.to(projector_dtype), mask, targets.to(features.device, projector_dtype), target_mask.to(features.device)))

    def measure() -> tuple[float, float]:
        squared, cosine, count = 0.0, 0.0, 0
        with torch.no_grad():
            for features, mask, targets, target_mask in chunks:
                tokens, token_mask = _residue_tokens(projector, features, mask)
                if not torch.equal(token_mask, target_mask):
                    raise RuntimeError("residue alignment: projector tokens and residue targets disagree in count")
                tokens, wanted = tokens[token_mask].float(), targets[target_mask].float()
                squared += float((tokens - wanted).pow(2).mean(-1).sum())
                cosine += float(torch.nn.functional.cosine_similarity(tokens, wanted, dim=-1).sum())
                count += tokens.shape[0]
        return squared / count, cosine / count

    was_training = projector.training
    projector.train()
    mse_before, cosine_before = measure()
    optimizer = torch.optim.Adam([p for p in projector.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        features, mask, targets, target_mask = chunks[int(torch.randint(len(chunks), (1,), generator=generator))]
        tokens, token_mask = _residue_tokens(projector, features, mask)
        loss = (tokens[token_mask].float() - targets[target_mask].float()).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    mse_after, cosine_after = measure()
    projector.train(was_training)
    result = AlignmentResult(mse_before, mse_after, cosine_before, cosine_after, steps)
    log.info(
        "residue alignment (%d steps, %d proteins): token-to-letter-embedding MSE %.4g -> %.4g, cosine %.3f -> %.3f",
        steps, len(proteins), mse_before, mse_after, cosine_before, cosine_after,
    )
    return result


@torch.no_grad()
def fit_summary_statistics(
    model: ProteinLLM, processor, proteins: Sequence[str], batch_size: int = 32, encoded: EncodedProteins | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the projector's `summary_center` / `summary_scale` to the per-dimension mean and standard deviation
    of the distinct `proteins`' mean features (the frozen encoder runs once, or `encoded` is reused: it must
    hold every one of `proteins`, and may hold more). A dimension that does not vary keeps scale 1, as
    scikit-learn's StandardScaler does. Returns (center, scale)."""
    projector = model.projector
    if not model.config.projector_config.summary_standardize:
        raise ValueError("fit_summary_statistics: the projector has no summary statistics (summary_standardize=False)")
    wanted = set(proteins)
    if len(wanted) < 2:
        raise ValueError(f"summary statistics need at least 2 distinct training proteins, got {len(wanted)}")
    if encoded is None:
        encoded = encode_proteins_frozen(model, processor, sorted(wanted), batch_size)
    elif not wanted <= set(encoded.proteins):
        raise ValueError(f"summary statistics: {len(wanted - set(encoded.proteins))} of the proteins are not in `encoded`")
    means = []
    for chunk, features, mask in encoded.chunks:
        rows = [row for row, protein in enumerate(chunk) if protein in wanted]
        # float64: the spread of features around a large shared mean
        means.append(masked_mean(features[rows].double(), mask[rows]))
    means = torch.cat(means)  # (P, D)
    center = means.mean(0)
    std = means.std(0, unbiased=False)
    scale = torch.where(std > 1e-6 * center.abs().clamp(min=1.0), std, torch.ones_like(std))
    projector.summary_center.copy_(center)
    projector.summary_scale.copy_(scale)
    log.info(
        "summary statistics from %d proteins: mean feature norm %.3g, per-dimension std %.3g to %.3g",
        len(wanted), float(center.norm()), float(std.min()), float(std.max()),
    )
    return projector.summary_center.clone(), projector.summary_scale.clone()


__all__ = [
    "AlignmentResult", "EncodedProteins", "align_projector_to_residues", "encode_proteins_frozen", "fit_summary_statistics",
    "residue_token_embeddings",
]
