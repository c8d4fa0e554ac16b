"""What `python train.py` prints: each line once, no advertisements or unactionable warnings, a progress
bar with loss and samples/s, and a closing table; and the pieces behind it."""


import pytest
import torch

from protein_llava.data.tokenize import Example
from protein_llava.training.console import count_samples, render_stage_table
from protein_llava.training.summary import DataCounts, RunSummary

SCREEN_LINES = 40


def screen_lines(output: str) -> list[str]:
    """The lines a terminal shows: each newline-ended line as its last carriage-return rewrite left it."""
    return [line.split("\r")[-1].strip() for line in output.split("\n") if line.split("\r")[-1].strip()]


@pytest.mark.slow
def test_each_stage_prints_one_screen_without_repeats_and_ends_with_its_table(tiny_two_stage_run):
    checkpoints = tiny_two_stage_run.checkpoints
    for stage in (1, 2):
        output = tiny_two_stage_run.output[stage]
        lines = screen_lines(output)
        repeated = sorted({line for line in lines if lines.count(line) > 1})
        assert not repeated, repeated
        assert len(lines) <= SCREEN_LINES, lines
        for unwanted in ("💡", "litlogger", "litmodels", "in eval mode", "LeafSpec", "Total length of", "gemm_4bit",
                         "is_gradient_checkpointing", "Warning", "{'stage'"):
            assert unwanted not in output, (stage, unwanted)
        assert any(line.startswith("Epoch 0: 100%") and "loss=" in line and "samples/s=" in line for line in lines), lines
        table = lines[lines.index(f"stage {stage} finished: tiny-stage{stage}"):]
        assert [row.split()[0] for row in table[2:]] == ["steps", "wall", "final", "records", "run", "model"]
        assert table[2].split() == ["steps", "6"]
        assert table[5] == "records     3200 kept of 3200; skipped: none"
        assert table[6] == f"run folder  {checkpoints / f'tiny-stage{stage}'}"
        # Everything also goes to the run's log file, once.
        log = (checkpoints / f"tiny-stage{stage}" / "hydra" / "train.log").read_text()
        assert log.count("Seed set to 0") == 1


def test_samples_are_rows_or_packed_segments():
    padded = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "labels": torch.zeros(3, 5, dtype=torch.long)}
    assert count_samples(padded) == 3
    from protein_llava.data.collate import PackedCollator

    examples = [Example(input_ids=(1,) * n, labels=(-100,) + (2,) * (n - 1), proteins=(), record_id=str(n)) for n in (4, 3, 5, 2)]
    rows = [examples[:2], examples[2:]]  # as the packed sampler hands them: 4+3 | 5+2, each with tail padding
    batch = PackedCollator(pad_token_id=0, pack_length=8)(rows)
    assert batch["input_ids"].shape[0] == 2 and count_samples(batch) == 4


def test_the_table_names_skips_with_their_reasons():
    summary = RunSummary(
        stage=2, run="tiny-stage2", out="/runs/tiny-stage2", steps=60, nonfinite_skipped_steps=1, final_train_loss=1.23456,
        data=DataCounts(seen=100, kept=90, skipped={"missing_field": 4, "bad_json": 6}), export="/runs/tiny-stage2/export",
        wall_seconds=125.4,
    )
    assert render_stage_table(summary).splitlines() == [
        "stage 2 finished: tiny-stage2",
        "-----------------------------",
        "steps       60 (1 skipped: non-finite)",
        "wall time   2:05",
        "final loss  1.2346",
        "records     90 kept of 100; skipped: bad_json 6, missing_field 4",
        "run folder  /runs/tiny-stage2",
        "model       /runs/tiny-stage2/export",
    ]


def test_old_summaries_still_read(tmp_path):
    # As the code before the typed summary wrote it (no out, no wall_seconds; an unknown key is ignored).
    (tmp_path / "summary.json").write_text(
        '{"stage": 1, "run": "tiny-stage1", "steps": 6, "nonfinite_skipped_steps": 0, "data": {"seen": 3200, "kept": 3200, '
        '"skipped": {}, "notes": {}, "examples": {}}, "final_train_loss": 4.9, "export": "x/export", "old_key": 1}'
    )
    summary = RunSummary.read(tmp_path)
    assert (summary.stage, summary.steps, summary.data.kept, summary.final_train_loss, summary.wall_seconds) == (1, 6, 3200, 4.9, None)
    summary.write(tmp_path)
    assert RunSummary.read(tmp_path) == summary
