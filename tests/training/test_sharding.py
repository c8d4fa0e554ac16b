"""FSDP2 (trainer=fsdp) on two CPU processes (gloo): the same losses as one process with the same global batch,
parameters really sharded, a killed run resumed from its sharded checkpoint to the same weights, and an export
that loads in one process."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_runs import forked_train
from torch.distributed.checkpoint import FileSystemReader

from protein_llava import ProteinLLM
from protein_llava.training.config import compose_train_config
from protein_llava.training.run import train
from protein_llava.training.run_folder import RunFolder

# Four optimizer steps of stage 2 (projector + LoRA) on the tiny preset in float32: a global batch of 4 samples,
# one process with 4 or two with 2 each. The sampler hands rank r every second batch of the same shuffled
# order, so the two ranks' step together is the one process's step.
STEPS = 4
# The first 64 demo records are plenty for 4 steps (every process tokenizes what it reads); the demo files
# are the shared two-stage run's (read, not written).
COMMON = ["stage=2", "model=tiny", f"trainer.max_steps={STEPS}", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
          "diagnostics.every=0", "checkpoint_every=2", "keep_checkpoints=-1", "data.limit=64"]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"]
# Float32 sums in another order (each rank reduces its half, then the gradients are averaged across ranks).
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def step_losses(run: Path) -> list[float]:
    with open(RunFolder(run).metrics_csv) as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def assert_same_export(first: Path, second: Path, exact: bool) -> dict[str, torch.Tensor]:
    a = ProteinLLM.from_pretrained(RunFolder(first).export).state_dict()
    b = ProteinLLM.from_pretrained(RunFolder(second).export).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], **WEIGHT_TOLERANCE, msg=name)
    return a


def diagnostic_rows(run: Path) -> dict[str, list[float]]:
    """Every logged diag/* value, in step order."""
    values: dict[str, list[float]] = {}
    with open(RunFolder(run).metrics_csv) as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith("diag/") and value:
                    values.setdefault(key, []).append(float(value))
    return values


CASES = {
    # Stage 1's residue alignment runs before fitting, the same on every rank: a few steps of it do here.
    # "torchrun": two ranks forked from a preloaded process with torchrun's variables (tests/script_runs.py);
    # "lightning": `train.py trainer.devices=2` in one forked process, where Lightning starts the second rank
    # itself, as `python train.py ...` in a new interpreter (its launcher for a user's plain command).
    "ddp-stage2-lora": ("ddp", ["stage=2"], "torchrun"),
    "fsdp-stage1": ("fsdp", ["stage=1", "stage1.align_steps=20"], "torchrun"),
    "fsdp-stage2-lora": ("fsdp", ["stage=2"], "lightning"),
    "fsdp-stage2-full": ("fsdp", ["stage=2", "stage2.llm=full"], "torchrun"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_as_one_process(case, two_stage_run, tmp_path):
    """DDP and FSDP on two CPU processes: per step, the loss over the global batch that one process computes;
    the exported weights equal to float32 round-off.

    Under FSDP with LoRA the interface diagnostics run every 2 steps: they gather the root unit's shards and
    sum the gradient slices over the ranks, and must read what one process reads."""
    engine, stage, launcher = CASES[case]
    projector = two_stage_run / "tiny-stage1" / "projector.safetensors"
    common = [*COMMON[1:], *stage, f"stage2.projector={projector}", f"checkpoints_dir={tmp_path}", f"data.demo_dir={two_stage_run / 'demo-data'}"]
    if case == "fsdp-stage2-lora":
        common = [*common, "diagnostics.every=2", "diagnostics.num_records=8"]
    one = train(compose_train_config([*common, "data.batch_size=4", f"out={tmp_path / 'one'}"]))
    engine_overrides = FSDP if engine == "fsdp" else ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"]
    overrides = [*common, *engine_overrides, f"out={tmp_path / engine}"]
    ranks = forked_train(overrides, tmp_path / "logs", world_size=2 if launcher == "torchrun" else 1)
    # Under Lightning's launcher the second rank writes to the first one's output, which it inherits.
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in ranks.output
    assert "Starting with 2 processes" in ranks.output
    assert one.nonfinite_skipped_steps == 0 == json.loads((tmp_path / engine / "summary.json").read_text())["nonfinite_skipped_steps"]
    single, parallel = step_losses(tmp_path / "one"), step_losses(tmp_path / engine)
    assert len(single) == len(parallel) == STEPS
    torch.testing.assert_close(torch.tensor(parallel), torch.tensor(single), **LOSS_TOLERANCE)
    assert_same_export(tmp_path / engine, tmp_path / "one", exact=False)
    if case == "fsdp-stage2-lora":
        one_diagnostics, fsdp_diagnostics = diagnostic_rows(tmp_path / "one"), diagnostic_rows(tmp_path / engine)
        assert one_diagnostics.keys() == fsdp_diagnostics.keys()
        assert {"diag/swap_delta_nll", "diag/grad_norm_projector", "diag/protein_token_rms"} <= set(one_diagnostics)
        for name, values in one_diagnostics.items():
            torch.testing.assert_close(torch.tensor(fsdp_diagnostics[name]), torch.tensor(values), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_a_killed_run_resumes_exactly(two_stage_run, tmp_path):
    """Stage 2 with LoRA on the decoder and on the encoder (whose layers become FSDP units too), dropout 0.1,
    the diagnostics on: shards on disk, and kill -9 then resume=auto gives the uninterrupted run's weights to
    the bit (each rank's own random state restored)."""
    projector = two_stage_run / "tiny-stage1" / "projector.safetensors"
    common = [*COMMON, "stage2.encoder=lora", "stage2.lora.dropout=0.1", "diagnostics.every=2", "diagnostics.num_records=8",
              f"stage2.projector={projector}", f"checkpoints_dir={tmp_path}", f"data.demo_dir={two_stage_run / 'demo-data'}"]
    forked_train([*common, *FSDP, f"out={tmp_path / 'fsdp'}"], tmp_path / "logs-straight", world_size=2)
    killed = forked_train([*common, *FSDP, f"out={tmp_path / 'killed'}", "callbacks=[{_target_: fault_injection.KillAfterCheckpoint, step: 3}]"],
                          tmp_path / "logs-killed", world_size=2, check=False)
    assert killed.exitcodes == [-9, -9], killed.output[-2000:]  # each rank SIGKILLed after step 3, step 2's checkpoint on disk
    start = tmp_path / "start.txt"
    forked_train([*common, *FSDP, f"out={tmp_path / 'killed'}", "resume=auto", f"callbacks=[{{_target_: fault_injection.RecordStartStep, path: '{start}'}}]"],
                 tmp_path / "logs-resumed", world_size=2)
    assert start.read_text() == "2"  # resumed from step 2's sharded checkpoint, not started over

    # Really sharded: in the checkpoint, every trainable tensor is stored as two halves, one written per rank.
    checkpoint = RunFolder(tmp_path / "fsdp").lightning / "step000004.ckpt"
    assert checkpoint.is_dir()
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    tensors = {key: meta for key, meta in metadata.state_dict_metadata.items() if key.startswith("state_dict.")}
    assert tensors and any("lora_A" in key for key in tensors) and any("projector" in key for key in tensors)
    assert any("protein_encoder" in key and "lora_A" in key for key in tensors)  # the encoder's adapters too
    files_by_tensor: dict[str, set[str]] = {}
    for index, storage in metadata.storage_data.items():
        files_by_tensor.setdefault(index.fqn, set()).add(storage.relative_path)
    for key, meta in tensors.items():
        rows = meta.size[0]
        chunk_rows = sorted(chunk.sizes[0] for chunk in meta.chunks)
        assert len(meta.chunks) == 2 and sum(chunk_rows) == rows and chunk_rows[1] - chunk_rows[0] <= 1, (key, chunk_rows)
        assert files_by_tensor[key] == {"__0_0.distcp", "__1_0.distcp"}, key
    # Only trainable tensors: the frozen weights are rebuilt from their source, as in one-process checkpoints.
    assert not any("base_layer" in key for key in tensors)

    # Killed after step 3 and resumed from step 2's sharded checkpoint: bit-identical to the uninterrupted run.
    straight = assert_same_export(tmp_path / "fsdp", tmp_path / "killed", exact=True)
    # The export is a full one-process folder.
    start_projector = load_file(str(projector))
    assert not torch.equal(straight["projector." + next(iter(start_projector))], next(iter(start_projector.values())))  # it moved
