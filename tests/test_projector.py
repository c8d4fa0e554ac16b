import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from protein_llava.configuration import ProjectorConfig, num_protein_tokens
from protein_llava.projector import ProteinProjector, build_projection, strided_mean_pool


def test_mlp2x_gelu_is_linear_gelu_linear():
    projection = build_projection("mlp2x_gelu", 8, 16)
    assert [type(m) for m in projection] == [nn.Linear, nn.GELU, nn.Linear]
    assert projection[0].in_features == 8 and projection[2].out_features == 16
    with pytest.raises(ValueError, match="unknown projector type 'conv'"):
        build_projection("conv", 8, 16)


def test_strided_mean_pool_against_a_loop():
    torch.manual_seed(0)
    features = torch.randn(2, 7, 3)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    pooled, pooled_mask = strided_mean_pool(features, mask, stride=3)
    assert pooled.shape == (2, 3, 3)
    # Row 0: windows [0:3], [3:6], [6:7]; row 1 (length 5): [0:3], [3:5], and an empty window.
    torch.testing.assert_close(pooled[0, 0], features[0, 0:3].mean(0))
    torch.testing.assert_close(pooled[0, 2], features[0, 6])
    torch.testing.assert_close(pooled[1, 1], features[1, 3:5].mean(0))
    assert pooled_mask.tolist() == [[True, True, True], [True, True, False]]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    reduction=st.sampled_from(["none", "mean_pool", "resampler"]),
    stride=st.integers(1, 6),
)
def test_projector_emits_exactly_num_protein_tokens(lengths, reduction, stride):
    config = ProjectorConfig(token_reduction=reduction, pool_stride=stride, num_latents=5, resampler_heads=2)
    projector = ProteinProjector(config, encoder_dim=8, text_dim=12)
    width = max(lengths)
    features = torch.randn(len(lengths), width, 8)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    tokens, token_mask = projector(features, mask)
    assert tokens.shape[-1] == 12
    assert token_mask.sum(1).tolist() == [num_protein_tokens(n, config) for n in lengths]


def test_resampler_ignores_padding():
    torch.manual_seed(0)
    config = ProjectorConfig(token_reduction="resampler", num_latents=4, resampler_heads=2)
    projector = ProteinProjector(config, encoder_dim=8, text_dim=6).eval()
    features = torch.randn(1, 5, 8)
    padded = torch.cat([features, torch.randn(1, 3, 8) * 100], dim=1)
    alone, _ = projector(features, torch.ones(1, 5, dtype=torch.bool))
    with_padding, _ = projector(padded, torch.tensor([[True] * 5 + [False] * 3]))
    torch.testing.assert_close(alone, with_padding, atol=1e-5, rtol=1e-5)
