"""Interface diagnostics: the swapped-protein records, the measurements, and what a run logs."""

import csv
import math

import pytest
import torch

from protein_llava import build_tiny
from protein_llava.data.collate import PaddedCollator
from protein_llava.data.records import Conversation, Turn
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.training.diagnostics import InterfaceDiagnostics, swap_proteins

PROTEINS = ["MKTAYIAKQR", "GGSGGSGGSW", "KKKKKDDDDD", "LLLLLVVVVA"]  # one length: swaps keep token counts


def conversations(proteins=PROTEINS):
    return [
        Conversation((Turn("user", f"What is this? <seq> {' '.join(p)} </seq>"), Turn("assistant", f"Answer {i}.")), f"r{i}")
        for i, p in enumerate(proteins)
    ]


def test_swap_proteins_gives_every_record_another_protein_and_keeps_the_text():
    original = conversations(["MKT", "GGSGG", "KKKKDDDD", "LLLLLVVVVAA"])
    swapped = swap_proteins(original)
    for before, after in zip(original, swapped):
        assert after.proteins != before.proteins and len(after.proteins) == 1
        assert after.turns[1] == before.turns[1]
        assert after.turns[0].content.split("<seq>")[0] == before.turns[0].content.split("<seq>")[0]
    # The next-longer protein (the longest takes the shortest): similar lengths, a fixed derangement.
    assert [c.proteins[0] for c in swapped] == ["GGSGG", "KKKKDDDD", "LLLLLVVVVAA", "MKT"]
    with pytest.raises(ValueError, match="at least 2 distinct proteins"):
        swap_proteins(conversations(["MKT", "MKT"]))


def _bound(model, processor, records):
    diagnostics = InterfaceDiagnostics(records, every=1, batch_size=3)
    diagnostics.bind(ConversationTokenizer(processor, max_length=256), processor.tokenizer.pad_token_id, processor)
    return diagnostics


def test_swap_delta_is_zero_when_the_projector_ignores_the_protein_and_not_otherwise():
    model, processor = build_tiny(seed=0)
    diagnostics = _bound(model, processor, conversations())
    reading = diagnostics.measure(model.eval(), torch.device("cpu"))
    assert reading["diag/swap_delta_nll"] == pytest.approx(reading["diag/nll_swapped"] - reading["diag/nll_true"])
    assert abs(reading["diag/swap_delta_nll"]) > 1e-6
    # Every protein token equal whatever the protein: a swap cannot change any answer's NLL.
    with torch.no_grad():
        for parameter in model.projector.parameters():
            parameter.zero_()
    blind = diagnostics.measure(model, torch.device("cpu"))
    assert blind["diag/swap_delta_nll"] == 0.0
    assert blind["diag/protein_token_rms"] == 0.0
    embedding_rms = float(model.get_input_embeddings().weight.pow(2).mean().sqrt())
    assert blind["diag/text_token_rms"] == pytest.approx(embedding_rms)


def test_measured_nll_is_the_models_own_loss():
    model, processor = build_tiny(seed=0)
    records = conversations()
    diagnostics = _bound(model, processor, records)
    reading = diagnostics.measure(model.eval(), torch.device("cpu"))
    tokenizer = ConversationTokenizer(processor, max_length=256)
    batch = PaddedCollator(processor.tokenizer.pad_token_id, processor)([tokenizer(c) for c in records])
    with torch.no_grad():
        direct = float(model(**batch).loss)  # transformers' mean over every supervised token of the batch
    assert reading["diag/nll_true"] == pytest.approx(direct, rel=1e-5)


def test_a_training_run_logs_and_plots_the_diagnostics(tmp_path):
    from protein_llava.training.config import compose_train_config
    from protein_llava.training.run import train

    # Gradient accumulation: the batch-end hook runs twice per optimizer step, and each step is measured once.
    overrides = ["stage=2", "model=tiny", "trainer.max_steps=5", "diagnostics.every=2", "diagnostics.num_records=8",
                 "trainer.accumulate_grad_batches=2",
                 f"checkpoints_dir={tmp_path}", "checkpoint_every=100", "data.demo_num_train=20", "data.demo_num_heldout=4"]
    stage1 = ["stage=1", *overrides[1:]]
    train(compose_train_config(stage1))
    summary = train(compose_train_config(overrides))
    rows = list(csv.DictReader((tmp_path / "tiny-stage2" / "logs" / "metrics.csv").open()))
    measured_steps = [int(r["step"]) for r in rows if r.get("diag/nll_true")]
    assert measured_steps == [0, 2, 4, 5]  # every 2 steps, and the last step
    measured = {int(r["step"]): r for r in rows if r.get("diag/nll_true")}
    for row in measured.values():
        delta = float(row["diag/nll_swapped"]) - float(row["diag/nll_true"])
        assert float(row["diag/swap_delta_nll"]) == pytest.approx(delta, abs=1e-9)
        assert float(row["diag/protein_token_rms"]) > 0 and float(row["diag/text_token_rms"]) > 0
    shares = [float(r["diag/grad_share_projector"]) for r in rows if r.get("diag/grad_share_projector")]
    assert len(shares) == 3 and all(0 < s < 1 for s in shares)  # LoRA and projector both get gradient in stage 2
    assert all(math.isfinite(float(r["diag/grad_norm_llm"])) for r in rows if r.get("diag/grad_norm_llm"))
    assert (tmp_path / "tiny-stage2" / "diagnostics.png").is_file()
    assert summary.steps == 5
