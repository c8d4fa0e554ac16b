import torch

from protein_llava import build_tiny
from protein_llava.data.collate import PaddedCollator
from protein_llava.data.records import Conversation, Turn
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.training.encoder_cache import RepresentationCache, encoder_identity
from sample_proteins import P1, P2


def batch_and_proteins(processor, cache=None):
    tokenize = ConversationTokenizer(processor, 512)
    rows = [
        Conversation((Turn("user", f"<seq> {P1} </seq> What?"), Turn("assistant", "A kinase.")), "a"),
        Conversation((Turn("user", f"<seq> {P2} </seq><seq> M K </seq>"), Turn("assistant", "Two.")), "b"),
    ]
    examples = [tokenize(c) for c in rows]
    return PaddedCollator(3, processor, representation_cache=cache)(examples), {p for e in examples for p in e.proteins}


def test_loss_with_the_cache_equals_the_online_encoder(tmp_path):
    model, processor = build_tiny()
    model.eval()
    online, proteins = batch_and_proteins(processor)
    exact = RepresentationCache(tmp_path / "fp32", model.protein_encoder, dtype=torch.float32)
    assert exact.add(proteins) == 3 and exact.add(proteins) == 0  # the second pass computes nothing
    cached_exact, _ = batch_and_proteins(processor, exact)
    assert "protein_input_ids" not in cached_exact
    half = RepresentationCache(tmp_path / "fp16", model.protein_encoder)
    half.add(proteins)
    cached_half, _ = batch_and_proteins(processor, half)
    with torch.no_grad():
        reference = model(**online).loss
        assert torch.equal(model(**cached_exact).loss, reference)
        torch.testing.assert_close(model(**cached_half).loss, reference, atol=2e-3, rtol=1e-3)


def test_cache_persists_across_instances_and_a_changed_encoder_invalidates_it(tmp_path):
    model, _ = build_tiny()
    cache = RepresentationCache(tmp_path, model.protein_encoder)
    cache.add(["MKTAYIAKQR"])
    again = RepresentationCache(tmp_path, model.protein_encoder)
    assert "MKTAYIAKQR" in again and again.features("MKTAYIAKQR").shape == (10, 32)
    layer_changed = build_tiny()[0].protein_encoder
    layer_changed.repr_layer = 1
    weights_changed = build_tiny(seed=1)[0].protein_encoder
    for encoder in (layer_changed, weights_changed):
        assert encoder_identity(encoder) != cache.identity
        assert "MKTAYIAKQR" not in RepresentationCache(tmp_path, encoder)
