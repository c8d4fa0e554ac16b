"""Residue alignment: the projector learns to write each residue as the decoder's embedding of its letter."""

import pytest
import torch

from protein_llava.builders import build_preset
from protein_llava.model.projector import strided_mean_pool
from protein_llava.training.alignment import _targets, align_projector_to_residues, residue_token_embeddings

PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "GGSWDEEKLLPPNQCHHRRT", "ACDEFGHIKLMNPQRSTVWY", "KKKKDDDDEEEERRRRLLLL"] * 2


def _nearest_letters(model, processor, proteins):
    table = residue_token_embeddings(model, processor.tokenizer)
    letters = sorted(table)
    matrix = torch.stack([table[r] for r in letters])
    with torch.no_grad():
        features, mask = model.protein_encoder(processor.encode_proteins(proteins))
        tokens, _ = model.projector(features, mask)
    hits = total = 0
    for row, residues in enumerate(proteins):
        similarity = torch.nn.functional.normalize(tokens[row, : len(residues)], dim=-1) @ torch.nn.functional.normalize(matrix, dim=-1).T
        hits += sum(letters[i] == r for i, r in zip(similarity.argmax(-1).tolist(), residues))
        total += len(residues)
    return hits / total


def test_alignment_makes_every_residue_token_its_letters_embedding():
    torch.manual_seed(0)
    model, processor = build_preset("tiny", projector={"output_norm": "rms"})
    before = _nearest_letters(model, processor, PROTEINS)
    encoder_before = {k: v.clone() for k, v in model.protein_encoder.state_dict().items()}
    result = align_projector_to_residues(model, processor, PROTEINS, steps=300, lr=3e-3)
    assert result.cosine_before < 0.2 < 0.9 < result.cosine_after and result.mse_after < result.mse_before / 10
    assert before < 0.3 and _nearest_letters(model, processor, PROTEINS) == 1.0
    for name, tensor in model.protein_encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), f"{name}: the encoder must stay frozen"


def test_targets_follow_the_token_reduction():
    model, processor = build_preset("tiny", projector={"token_reduction": "mean_pool", "pool_stride": 3})
    table = residue_token_embeddings(model, processor.tokenizer)
    targets, mask = _targets(["MKTAY", "GG"], table, 5, model.config.projector_config)
    assert mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(targets[0, 0], torch.stack([table["M"], table["K"], table["T"]]).mean(0))
    torch.testing.assert_close(targets[0, 1], torch.stack([table["A"], table["Y"]]).mean(0))
    ids = processor.tokenizer(" K", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(table["K"], model.get_input_embeddings().weight[ids].detach().float().mean(0))
    pooled, _ = strided_mean_pool(torch.ones(1, 5, 2), torch.ones(1, 5, dtype=torch.bool), 3)
    assert pooled.shape[1] == targets.shape[1]


def test_alignment_refuses_tokens_that_stand_for_no_residue():
    model, processor = build_preset("tiny", projector={"token_reduction": "resampler", "num_latents": 4, "resampler_heads": 2})
    with pytest.raises(ValueError, match="needs projector token_reduction none or mean_pool"):
        align_projector_to_residues(model, processor, PROTEINS, steps=1)


def test_summary_statistics_standardise_the_training_proteins_mean_features(tmp_path):
    from protein_llava import ProteinLLM
    from protein_llava.training.alignment import fit_summary_statistics
    from protein_llava.training.checkpointing import load_projector, save_projector

    torch.manual_seed(0)
    projector = {"summary_token": True, "summary_standardize": True, "output_norm": "rms"}
    model, processor = build_preset("tiny", projector=projector)
    encoder_before = {k: v.clone() for k, v in model.protein_encoder.state_dict().items()}
    proteins = PROTEINS + ["MKTAYIAKQRQISFVKSHFSRQ"]  # a duplicate counts once
    center, scale = fit_summary_statistics(model, processor, proteins, batch_size=3)
    with torch.no_grad():
        features, mask = model.protein_encoder(processor.encode_proteins(sorted(set(proteins))))
        means = (features * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(center, means.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scale, means.std(0, unbiased=False), atol=1e-5, rtol=1e-4)
    standardised = (means - model.projector.summary_center) / model.projector.summary_scale
    torch.testing.assert_close(standardised.mean(0), torch.zeros_like(center), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardised.std(0, unbiased=False), torch.ones_like(scale), atol=1e-4, rtol=0)
    for name, tensor in model.protein_encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), f"{name}: the encoder must stay frozen"
    # The statistics travel with the projector file (stage 1 -> stage 2) and with the export.
    other, _ = build_preset("tiny", projector=projector)
    save_projector(model, tmp_path / "projector.safetensors")
    load_projector(other, tmp_path / "projector.safetensors")
    assert torch.equal(other.projector.summary_center, center) and torch.equal(other.projector.summary_scale, scale)
    model.save_pretrained(tmp_path / "export")
    loaded = ProteinLLM.from_pretrained(tmp_path / "export")
    assert torch.equal(loaded.projector.summary_center, center) and torch.equal(loaded.projector.summary_scale, scale)
    ids = processor.encode_proteins(PROTEINS[:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_protein_features(ids), model.get_protein_features(ids))


def test_summary_statistics_refuse_a_projector_without_them():
    from protein_llava.training.alignment import fit_summary_statistics

    model, processor = build_preset("tiny", projector={"summary_token": True})
    with pytest.raises(ValueError, match="summary_standardize=False"):
        fit_summary_statistics(model, processor, PROTEINS)


def test_one_encoder_pass_serves_the_statistics_and_the_alignment():
    from protein_llava.training.alignment import encode_proteins_frozen, fit_summary_statistics

    projector = {"summary_token": True, "summary_standardize": True, "output_norm": "rms"}
    results = []
    for shared in (False, True):
        torch.manual_seed(0)
        model, processor = build_preset("tiny", projector=projector)
        encoded = encode_proteins_frozen(model, processor, PROTEINS) if shared else None
        # The statistics from a subset of the encoded proteins (training, not validation, proteins).
        fit_summary_statistics(model, processor, PROTEINS[:3], encoded=encoded)
        align_projector_to_residues(model, processor, PROTEINS, steps=20, encoded=encoded)
        results.append({k: v.clone() for k, v in model.projector.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    with pytest.raises(ValueError, match="holds other proteins"):
        align_projector_to_residues(model, processor, PROTEINS[:2], steps=1, encoded=encoded)
    with pytest.raises(ValueError, match="not in `encoded`"):
        fit_summary_statistics(model, processor, ["MKKKKKKKKW", "MWWWWW"], encoded=encoded)
