"""GPU-only checks (flash-attention, bf16). They run where CUDA is present and skip with the reason elsewhere."""

import pytest
import torch

from protein_llava import ProteinLLM, ProteinLLMProcessor
from sample_proteins import P1, P2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (flash-attention, bf16, the GPU trainer configs)"),
]


def _inputs(folder):
    processor = ProteinLLMProcessor.from_pretrained(folder)
    return processor, processor(text=[f"<seq> {P1} </seq> What?", f"<seq> {P2} </seq> and text"], padding_side="right")


def test_flash_attention_matches_sdpa_in_bf16(tiny_folder):
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed (pip install flash-attn --no-build-isolation)")
    _, inputs = _inputs(tiny_folder)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    logits = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = ProteinLLM.from_pretrained(tiny_folder, attn_implementation=attn, dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            logits[attn] = model(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits["flash_attention_2"][mask], logits["sdpa"][mask], atol=3e-2, rtol=3e-2)


def test_bf16_training_step_is_finite_and_updates_the_projector(tiny_folder):
    _, inputs = _inputs(tiny_folder)
    model = ProteinLLM.from_pretrained(tiny_folder, dtype=torch.bfloat16).cuda().train()
    model.set_trainable(encoder=False, projector=True, llm=False)
    batch = {k: v.cuda() for k, v in inputs.items()}
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == model.config.protein_token_id, -100)
    before = [p.detach().clone() for p in model.projector.parameters()]
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-3)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.projector.parameters()))


@pytest.mark.parametrize("trainer", [["trainer=gpu"], ["trainer=fsdp", "trainer.devices=1"]], ids=["gpu", "fsdp-one-gpu"])
def test_the_gpu_trainer_configs_train(trainer, tmp_path):
    """configs/train/trainer/gpu.yaml and fsdp.yaml (NCCL, one GPU) as a user runs them, on the tiny preset."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "train.py"), "stage=1", "model=tiny", *trainer, "trainer.max_steps=2", "stage1.align_steps=10",
         f"checkpoints_dir={tmp_path}", f"out={tmp_path / 'run'}", "hydra/job_logging=none", "hydra/hydra_logging=none"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert ProteinLLM.from_pretrained(tmp_path / "run" / "export") is not None
