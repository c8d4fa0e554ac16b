import pytest
import torch
from hypothesis import given, settings
from huggingface_hub.errors import StrictDataclassClassValidationError
from hypothesis import strategies as st
from torch import nn

from protein_llava.model.configuration import ProjectorConfig, num_protein_tokens
from protein_llava.model.projector import ProteinProjector, build_projection, strided_mean_pool


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
    reduction=st.sampled_from(["none", "mean_pool", "resampler", "mean"]),
    stride=st.integers(1, 6),
    summary_token=st.booleans(),
)
def test_projector_emits_exactly_num_protein_tokens(lengths, reduction, stride, summary_token):
    config = ProjectorConfig(
        token_reduction=reduction, pool_stride=stride, num_latents=5, resampler_heads=2, summary_token=summary_token
    )
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


def test_summary_token_leads_each_protein_and_is_the_projected_mean():
    torch.manual_seed(0)
    config = ProjectorConfig(token_reduction="mean_pool", pool_stride=2, summary_token=True)
    projector = ProteinProjector(config, encoder_dim=8, text_dim=6).eval()
    features = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    tokens, token_mask = projector(features, mask)
    assert token_mask.tolist() == [[True, True, True, True], [True, True, True, False]]
    for row, length in enumerate((5, 3)):
        expected = projector.summary_projection(features[row, :length].mean(0))
        torch.testing.assert_close(tokens[row, 0], expected)
        # The rest are the plain strided-mean tokens, after the summary.
        pooled, _ = strided_mean_pool(features[row : row + 1, :length], mask[row : row + 1, :length], 2)
        torch.testing.assert_close(tokens[row, 1 : 1 + pooled.shape[1]], projector.projection(pooled[0]))
    # Its own projection: the summary is not the residue tokens' projection of the mean.
    assert not torch.allclose(tokens[0, 0], projector.projection(features[0].mean(0)))


def test_rms_output_norm_holds_every_token_at_the_decoder_embedding_rms(tiny):
    from protein_llava.builders import build_preset

    model, processor = build_preset("tiny", projector={"output_norm": "rms", "summary_token": True})
    embedding_rms = float(model.get_input_embeddings().weight.pow(2).mean().sqrt())
    assert model.config.projector_config.output_scale == pytest.approx(embedding_rms)
    ids = processor.encode_proteins(["MKTAYIAKQRQISFVKSHFSRQ", "GGGGSWWWW"])
    with torch.no_grad():
        tokens = model.get_protein_features(ids)
        # Inflate the projection: without the norm, token scale follows the weights (as stage 1 at lr 1e-3 did).
        for module in model.projector.projection.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(50)
        inflated = model.get_protein_features(ids)
    rms = tokens.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, embedding_rms), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(inflated.pow(2).mean(-1).sqrt(), rms, rtol=1e-3, atol=1e-6)
    # The plain projector's tokens are nowhere near that scale at init (std-0.02 weights).
    plain, plain_processor = build_preset("tiny")
    with torch.no_grad():
        plain_rms = float(plain.get_protein_features(plain_processor.encode_proteins(["MKTAYIAKQRQISFVKSHFSRQ"])).pow(2).mean().sqrt())
    assert abs(plain_rms - embedding_rms) > 0.5 * embedding_rms


def test_output_norm_and_scale_are_validated():
    with pytest.raises(StrictDataclassClassValidationError, match="unknown output_norm 'layer'"):
        ProjectorConfig(output_norm="layer")
    with pytest.raises(StrictDataclassClassValidationError, match="output_scale must be > 0"):
        ProjectorConfig(output_norm="rms", output_scale=0.0)


def test_standardised_summary_is_the_projection_of_the_standardised_mean():
    torch.manual_seed(0)
    config = ProjectorConfig(token_reduction="mean_pool", pool_stride=2, summary_token=True, summary_standardize=True)
    projector = ProteinProjector(config, encoder_dim=8, text_dim=6).eval()
    features = torch.randn(2, 5, 8) + 10.0
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    # Identity until fitted: the same tokens as the plain summary.
    plain = ProteinProjector(ProjectorConfig(token_reduction="mean_pool", pool_stride=2, summary_token=True), 8, 6).eval()
    plain.load_state_dict({k: v for k, v in projector.state_dict().items() if not k.startswith("summary_c") and not k.startswith("summary_s")})
    torch.testing.assert_close(projector(features, mask)[0], plain(features, mask)[0])
    center, scale = torch.randn(8) + 10.0, torch.rand(8) + 0.5
    projector.summary_center.copy_(center)
    projector.summary_scale.copy_(scale)
    tokens, _ = projector(features, mask)
    for row, length in enumerate((5, 3)):
        expected = projector.summary_projection((features[row, :length].mean(0) - center) / scale)
        torch.testing.assert_close(tokens[row, 0], expected)
    # The residue tokens do not see the statistics.
    torch.testing.assert_close(tokens[:, 1:], plain(features, mask)[0][:, 1:])
    assert set(projector.state_dict()) - set(plain.state_dict()) == {"summary_center", "summary_scale"}


def test_summary_standardize_needs_a_summary_token():
    with pytest.raises(StrictDataclassClassValidationError, match="summary_standardize needs summary_token=True"):
        ProjectorConfig(summary_standardize=True)
