"""QLoRA stage 2 on CPU (bitsandbytes 4-bit NF4 decoder + LoRA): training, gradients, the de-quantised export."""

import csv
import json
import logging
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from protein_llava import ProteinLLM, build_preset, build_tiny
from protein_llava.quantization import is_4bit, nf4_config
from protein_llava.training.checkpointing import save_projector
from protein_llava.training.export import export_run
from protein_llava.training.config import LoraSettings, compose_train_config
from protein_llava.training.plan import resolve_plan
from protein_llava.training.run import train
from protein_llava.training.stage import apply_stage_spec, stage2_spec

compose_train = compose_train_config


def tiny_qlora(compute_dtype=torch.float32):
    """The tiny ProteinLLM, its decoder in 4-bit, wrapped for stage 2 QLoRA (seed 0)."""
    model, processor = build_preset("tiny", dtype=torch.float32, quantization_config=nf4_config(compute_dtype))
    return apply_stage_spec(model, stage2_spec("qlora"), LoraSettings(r=8, alpha=16, dropout=0.0)), processor


def batch(processor):
    inputs = processor(text=["<seq> M K T A Y I A K Q R </seq> What is it?", "Which residue carries a thiol group?"])
    ignored = (inputs["attention_mask"] == 0) | (inputs["input_ids"] == processor.protein_token_id)
    labels = inputs["input_ids"].masked_fill(ignored, -100)
    return {**inputs, "labels": labels}


def lora_parameters(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def gradients_after_one_backward(eval_forward_first: bool) -> dict:
    torch.manual_seed(0)
    model, processor = tiny_qlora()
    torch.manual_seed(1)
    for name, parameter in lora_parameters(model).items():
        if "lora_B" in name:  # B starts at zero, which leaves A without gradient on the first step
            torch.nn.init.normal_(parameter, std=0.05)
    if eval_forward_first:  # as validation and generation do
        model.eval()
        with torch.no_grad():
            model(**batch(processor))
        model.train()
    model(**batch(processor)).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_only_the_decoder_is_4bit_and_every_lora_parameter_learns(one_thread):
    model, _ = tiny_qlora()
    decoder = model.language_model
    assert is_4bit(decoder) and not is_4bit(model.protein_encoder) and not is_4bit(model.projector)
    assert type(decoder.base_model.model.lm_head).__name__ == "Linear"  # the LM head stays full precision
    assert model.trainable_parts() == {"encoder": False, "projector": True, "llm": True}
    lora = lora_parameters(model)
    assert len(lora) == 2 * 7 * 2  # A and B on 7 linear maps (q k v o gate up down) of 2 layers
    assert {p.dtype for p in lora.values()} == {torch.float32}

    grads = gradients_after_one_backward(eval_forward_first=False)
    assert len(grads) == len(lora) + len(list(model.projector.parameters()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # bitsandbytes must not have repacked the 4-bit weights into its CPU inference layout during the eval
    # forward: that layout passes no gradient to a layer's input, so earlier layers' gradients would change.
    after_eval = gradients_after_one_backward(eval_forward_first=True)
    assert all(torch.allclose(after_eval[name], grad) for name, grad in grads.items())


def test_bfloat16_compute_dtype_puts_the_adapters_in_bfloat16(one_thread):
    model, processor = tiny_qlora(compute_dtype=torch.bfloat16)
    assert {p.dtype for p in lora_parameters(model).values()} == {torch.bfloat16}
    loss = model(**batch(processor)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in lora_parameters(model).values())


@pytest.mark.parametrize("merge_adapter", [True, False], ids=["merged", "adapter-apart"])
def test_export_equals_the_4bit_model_with_its_adapter(merge_adapter, tmp_path, one_thread):
    model, processor = tiny_qlora()
    torch.manual_seed(1)
    for name, parameter in lora_parameters(model).items():
        if "lora_B" in name:  # B starts at zero; a trained-looking adapter
            torch.nn.init.normal_(parameter, std=0.05)
    inputs = processor(text=["<seq> M K T A Y I A K Q R </seq> What is it?", "Plain text, no protein."])
    model.eval()
    with torch.no_grad():
        with_adapter = model(**inputs).logits
        with model.language_model.disable_adapter():
            base_4bit = model(**inputs).logits
    assert (with_adapter - base_4bit).abs().max() > 0.05  # the adapter changes the output

    folder = export_run(model, processor, processor.tokenizer, tmp_path / "export", merge_adapter=merge_adapter)
    assert "quantization_config" not in (folder / "config.json").read_text()
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if "absmax" in k or "quant" in k]
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}
    exported = ProteinLLM.from_pretrained(folder).eval()
    assert not is_4bit(exported)
    if not merge_adapter:
        exported.load_language_adapter(str(folder / "adapter"), merge=True)
    with torch.no_grad():
        logits = exported(**inputs).logits
    # The export holds exactly the de-quantised 4-bit weights plus the adapter's delta, so it matches the
    # 4-bit model up to float32 rounding (measured ~1e-6), not up to quantisation error: the original
    # full-precision decoder is ~0.1 away from its 4-bit copy on these logits.
    assert (logits - with_adapter).abs().max() < 1e-4
    full_precision, _ = build_tiny(seed=0)
    full_precision.projector.load_state_dict(exported.projector.state_dict())
    with torch.no_grad():
        assert (full_precision(**inputs).logits - base_4bit).abs().max() > 1e-2
    card = (folder / "README.md").read_text()
    assert "QLoRA: LoRA adapters trained on a 4-bit NF4 decoder" in card and "loads without bitsandbytes" in card


def test_qlora_stage2_run_lowers_the_loss_and_exports_a_plain_model(tmp_path, one_thread, caplog):
    initial, _ = build_tiny(seed=0)
    save_projector(initial, tmp_path / "projector.safetensors")
    cfg = compose_train([
        "stage=2", "model=tiny", "stage2.llm=qlora", f"stage2.projector={tmp_path / 'projector.safetensors'}",
        "trainer.max_steps=8", "stage2.warmup_steps=0", "stage2.lr=3e-3", "trainer.log_every_n_steps=1",
        "data.limit=64", f"out={tmp_path / 'run'}", f"checkpoints_dir={tmp_path}",
    ])
    with caplog.at_level(logging.WARNING, logger="protein_llava.training.plan"):
        summary = train(cfg)
    assert ("stage2.llm=qlora on CPU" in caplog.text) == (not torch.cuda.is_available())
    run = tmp_path / "run"
    with (run / "logs" / "metrics.csv").open() as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert summary.steps == 8 and len(losses) == 8
    assert losses[-1] < losses[0] - 0.1, losses  # measured 5.53 -> 5.32
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as adapter:
        lora_b = [adapter.get_tensor(k) for k in adapter.keys() if "lora_B" in k]
    assert len(lora_b) == 14 and all(b.abs().max() > 0 for b in lora_b)  # trained away from B = 0
    exported = ProteinLLM.from_pretrained(run / "export")
    assert not is_4bit(exported) and "quantization_config" not in (run / "export" / "config.json").read_text()
    changed = {k for k, v in exported.state_dict().items() if not torch.equal(v, initial.state_dict()[k])}
    assert any(k.startswith("projector.") for k in changed)
    assert not any(k.startswith("protein_encoder.") for k in changed)

    from protein_llava.training.run_folder import RunFolder, stage_card_rows

    # train() called in-process writes no Hydra folder: save the composed config where train.py would.
    (run / "hydra" / ".hydra").mkdir(parents=True)
    (run / "hydra" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    folder = RunFolder(run)
    rows = stage_card_rows(folder, folder.summary(), folder.config())
    # The run's card and the export folder's own card describe QLoRA in the same words (quantization.describe_qlora).
    assert "decoder qlora (r 16, alpha 32) on a 4-bit NF4 decoder (bitsandbytes, double quantisation on, compute dtype float32); exported with the adapter merged into the de-quantised weights, so the folder loads without bitsandbytes" in (
        rows["stage 2 (instruction tuning)"]
    )
    export_card = (run / "export" / "README.md").read_text()
    assert "trained on a 4-bit NF4 decoder (bitsandbytes, double quantisation on, compute dtype float32); exported with the adapter merged into the de-quantised weights in float32, so the folder loads without bitsandbytes" in export_card


def test_qlora_config_checks(monkeypatch):
    base = ["stage=2", "model=text-only", "stage2.llm=qlora"]
    with pytest.raises(ValueError, match="stage2.qlora.compute_dtype must be null or one of"):
        resolve_plan(compose_train([*base, "stage2.qlora.compute_dtype=float8"]))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="stage2.llm=qlora needs bitsandbytes"):
        resolve_plan(compose_train(base))


def test_text_only_arm_with_qlora_exports_a_plain_decoder(tmp_path, one_thread):
    cfg = compose_train([
        "stage=2", "model=text-only", "model.preset=tiny", "stage2.llm=qlora", "trainer.max_steps=2",
        "data.limit=16", f"out={tmp_path / 'run'}", f"checkpoints_dir={tmp_path}",
    ])
    assert train(cfg).steps == 2
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
