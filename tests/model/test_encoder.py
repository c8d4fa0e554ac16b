import esm
import pytest
import torch

from protein_llava.model.configuration import ProteinEncoderConfig
from protein_llava.model.encoder import ProteinEncoder, esm2_alphabet


def _tokens(sequences):
    converter = esm2_alphabet().get_batch_converter()
    _, _, tokens = converter([(str(i), s) for i, s in enumerate(sequences)])
    return tokens


def test_encoder_is_fair_esm_esm2():
    encoder = ProteinEncoder(ProteinEncoderConfig(num_layers=2, embed_dim=32, attention_heads=4))
    assert isinstance(encoder.esm, esm.model.esm2.ESM2)


def test_representations_match_fair_esm_directly():
    torch.manual_seed(0)
    encoder = ProteinEncoder(ProteinEncoderConfig(num_layers=2, embed_dim=32, attention_heads=4, repr_layer=1)).eval()
    sequences = ["MKTAYIAKQR", "MSIP"]
    tokens = _tokens(sequences)  # fair-esm's own batch converter: <cls> residues <eos> <pad>...
    features, mask = encoder(tokens)
    reference = encoder.esm(tokens, repr_layers=[1])["representations"][1]
    assert features.shape == (2, 10, 32)
    assert mask.sum(1).tolist() == [10, 4]
    torch.testing.assert_close(features[0], reference[0, 1:11])
    torch.testing.assert_close(features[1, :4], reference[1, 1:5])


def test_frozen_encoder_builds_no_graph_and_trainable_one_does():
    encoder = ProteinEncoder(ProteinEncoderConfig(num_layers=1, embed_dim=16, attention_heads=2))
    tokens = _tokens(["MKT"])
    encoder.requires_grad_(False)
    assert not encoder(tokens)[0].requires_grad
    encoder.requires_grad_(True)
    assert encoder(tokens)[0].requires_grad


def test_bf16_weights_run_outside_autocast_and_match_fair_esm_under_autocast():
    # fair-esm's rotary tables stay fp32: with bf16 weights and no autocast its attention matmul mixes dtypes.
    torch.manual_seed(0)
    encoder = ProteinEncoder(ProteinEncoderConfig(num_layers=2, embed_dim=32, attention_heads=4)).eval()
    tokens = _tokens(["MKTAYIAKQR", "MSIP"])
    full, _ = encoder(tokens)
    encoder.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):  # else the guard in ProteinEncoder.forward is moot
        encoder.esm(tokens, repr_layers=[2])
    half, mask = encoder(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = encoder.esm(tokens, repr_layers=[2])["representations"][2]
    torch.testing.assert_close(half[0], reference[0, 1:11])
    torch.testing.assert_close(half[1, :4], reference[1, 1:5])
    # bf16 round-off only: the same features as the fp32 encoder to about 2 significant digits.
    torch.testing.assert_close(half[mask].float(), full[mask], atol=0.1, rtol=0.05)
