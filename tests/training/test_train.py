"""Whole training runs on the tiny preset: the literal commands (the shared run, tests/training/conftest.py), kill -9 then
resume, and what each stage trains (data parallel: test_sharding.py)."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from script_runs import TWO_STAGE_OVERRIDES, forked_train

from protein_llava import ProteinLLM, ProteinLLMProcessor, build_tiny
from protein_llava.training.config import LoraSettings, compose_train_config
from protein_llava.training.plan import resolve_plan
from protein_llava.training.run import train
from protein_llava.training.run_folder import RunFolder
from protein_llava.training.stage import ESM2_LORA_TARGETS, StageSpec, apply_stage_spec, stage2_spec

compose_train = compose_train_config


@pytest.mark.slow
def test_stage1_outputs_and_what_it_trained(two_stage_run):
    run = two_stage_run / "tiny-stage1"
    for name in ("projector.safetensors", "loss.png", "data_report.json", "summary.json", "logs/metrics.csv", "export/config.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "lightning").glob("*.ckpt"))) == 2
    # RunFolder, the one place the layout is spelt, names what train.py wrote, and reads it back.
    folder = RunFolder(run)
    for path in (folder.projector, folder.loss_plot, folder.metrics_csv, folder.config_file, folder.export / "config.json"):
        assert path.is_file(), path
    assert folder.is_stage1() and folder.config().stage == 1 and folder.data_report().train.kept > 0
    assert len(list(folder.lightning.glob("*.ckpt"))) == 2
    exported = ProteinLLM.from_pretrained(run / "export")
    initial, _ = build_tiny(seed=0)
    trained_projector = load_file(str(run / "projector.safetensors"))
    for name, tensor in exported.state_dict().items():
        before = initial.state_dict()[name]
        if name.startswith("projector."):
            assert torch.equal(tensor, trained_projector[name.removeprefix("projector.")])
            assert not torch.equal(tensor, before), f"{name} did not train"
        else:
            assert torch.equal(tensor, before), f"{name} changed in stage 1"
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["kept"] == 3200 and report["train"]["skipped"] == {}  # 800 proteins × 4 question types


@pytest.mark.slow
def test_stage2_trains_projector_and_lora_then_exports_merged(two_stage_run):
    stage1 = ProteinLLM.from_pretrained(two_stage_run / "tiny-stage1" / "export")
    run = two_stage_run / "tiny-stage2"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (RunFolder(run).adapter / "adapter_model.safetensors").is_file() and not RunFolder(run).is_stage1()
    exported = ProteinLLM.from_pretrained(run / "export").eval()
    changed = {k for k, v in exported.state_dict().items() if not torch.equal(v, stage1.state_dict()[k])}
    assert any(k.startswith("projector.") for k in changed)
    assert any(k.startswith("language_model.") for k in changed)  # merged LoRA deltas
    assert not any(k.startswith("protein_encoder.") for k in changed)
    # The exported folder is self-contained: the README's API works on it.
    processor = ProteinLLMProcessor.from_pretrained(run / "export")
    out = exported.generate(**processor(text=["<seq> M K T </seq> What?"]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 0


@pytest.mark.slow
def test_stage2_encoder_lora_trains_adapters_and_exports_a_plain_esm2(two_stage_run, tmp_path):
    stage1 = ProteinLLM.from_pretrained(two_stage_run / "tiny-stage1" / "export")
    overrides = ["model=tiny", "trainer.max_steps=4", "data.limit=64", f"checkpoints_dir={two_stage_run}", "checkpoint_every=100",
                 "stage=2", "stage2.encoder=lora", f"out={tmp_path / 'run'}"]
    summary = train(compose_train(overrides))
    assert summary.steps == 4
    run = tmp_path / "run"
    assert (run / "encoder_adapter" / "adapter_model.safetensors").is_file()
    exported = ProteinLLM.from_pretrained(run / "export").eval()
    # A plain fair-esm ESM2 again (same keys as before), its LoRA deltas merged into the linear layers only.
    assert set(exported.state_dict()) == set(stage1.state_dict())
    changed = {k for k, v in exported.state_dict().items() if not torch.equal(v, stage1.state_dict()[k])}
    encoder_changed = {k for k in changed if k.startswith("protein_encoder.")}
    assert encoder_changed and all(k.rsplit(".", 2)[-2] in ESM2_LORA_TARGETS for k in encoder_changed)
    assert not any("embed_tokens" in k or "layer_norm" in k for k in encoder_changed)


def test_stage2_encoder_setting_is_checked(tmp_path):
    with pytest.raises(ValueError, match="stage2.encoder must be one of frozen, lora, full; got 'partial'"):
        stage2_spec("lora", encoder="partial")
    decoder = build_tiny(seed=0)[0].language_model
    with pytest.raises(ValueError, match="stage2.encoder=lora needs a multimodal model"):
        apply_stage_spec(decoder, stage2_spec("lora", encoder="lora"), LoraSettings())
    with pytest.raises(ValueError, match="the text-only arm trains only the decoder: stage2.llm=frozen would train nothing"):
        apply_stage_spec(decoder, stage2_spec("frozen"), LoraSettings())
    with pytest.raises(ValueError, match="stage9 freezes encoder, projector and decoder: it would train nothing"):
        apply_stage_spec(build_tiny(seed=0)[0], StageSpec("stage9", projector="frozen"))


@pytest.mark.parametrize(
    ("spec", "trains"),
    [
        (stage2_spec("full"), {"encoder": False, "projector": True, "llm": True}),
        (stage2_spec("lora", encoder="full"), {"encoder": True, "projector": True, "llm": True}),
        (StageSpec("stage2", projector="frozen", llm="lora"), {"encoder": False, "projector": False, "llm": True}),
    ],
)
def test_a_spec_trains_exactly_what_it_names(spec, trains, tmp_path):
    from protein_llava.training.optim import OptimConfig
    from protein_llava.training.stage import StageModule

    model, processor = build_tiny(seed=0)
    model = apply_stage_spec(model, spec, LoraSettings(r=2))
    assert model.trainable_parts() == trains
    module = StageModule(model, OptimConfig(total_steps=1, warmup_steps=0, lr=1e-2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    inputs = processor(text=["<seq> M K T A Y </seq> What is it?"])
    module.loss({**inputs, "labels": inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.protein_token_id, -100)}).backward()
    optimizer.step()
    after = model.state_dict()
    prefixes = {"encoder": "protein_encoder.", "projector": "projector.", "llm": "language_model."}
    for part, prefix in prefixes.items():
        changed = any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix))
        # With LoRA, B starts at zero: the first step moves B (A's gradient is zero until B is not).
        assert changed == trains[part], part


@pytest.mark.slow
def test_stage2_refuses_a_missing_or_mismatched_projector(two_stage_run, tmp_path):
    cfg = compose_train(["stage=2", "model=tiny", f"stage2.projector={tmp_path / 'none.safetensors'}"])
    with pytest.raises(FileNotFoundError, match="none.safetensors: no such file. Run `python train.py stage=1`"):
        resolve_plan(cfg)
    # A projector trained for another shape (mean-pool reduction here) is refused before training.
    from protein_llava.training.checkpointing import save_projector
    from protein_llava.builders import build_protein_llm
    from protein_llava.model.configuration import ProjectorConfig, ProteinLLMConfig
    from protein_llava.text_tokenizer import byte_level_tokenizer

    config = ProteinLLMConfig.from_preset("tiny")
    config.projector_config = ProjectorConfig(projector_type="linear")
    other, _ = build_protein_llm(config, byte_level_tokenizer())
    save_projector(other, tmp_path / "other.safetensors")
    cfg = compose_train(["stage=2", "model=tiny", f"stage2.projector={tmp_path / 'other.safetensors'}", f"out={tmp_path / 'run'}", f"checkpoints_dir={two_stage_run}"])
    with pytest.raises(ValueError, match="other.safetensors was trained for projector_config="):
        resolve_plan(cfg)


def test_text_only_arm_exports_a_plain_decoder(tmp_path):
    cfg = compose_train(["stage=2", "model=text-only", "model.preset=tiny", "trainer.max_steps=2", "data.limit=64", f"out={tmp_path}",
                         f"checkpoints_dir={tmp_path}"])
    summary = train(cfg)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "llama" and summary.steps == 2


def test_text_only_stage1_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="model=text-only has no projector to align: run it as stage=2"):
        resolve_plan(compose_train(["stage=1", "model=text-only"]))


@pytest.mark.slow
def test_unknown_key_is_named_before_anything_loads(tmp_path):
    result = forked_train(["stage=1", "model=tiny", "trainer.max_stepz=3", f"out={tmp_path}"], tmp_path / "logs", check=False)
    assert result.returncode != 0 and "max_stepz" in result.stderr
    assert not (tmp_path / "summary.json").exists()


def _trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    """What a run trained: its projector and, in stage 2, its LoRA adapter."""
    tensors = {f"projector.{k}": v for k, v in load_file(str(run / "projector.safetensors")).items()}
    adapter = RunFolder(run).adapter / "adapter_model.safetensors"
    if adapter.is_file():
        tensors.update({f"adapter.{k}": v for k, v in load_file(str(adapter)).items()})
    return tensors


def _killed_and_resumed(overrides, out: Path, kill_after: int, resumed_from: int) -> None:
    """`train.py OVERRIDES` SIGKILLed after step `kill_after`, then `resume=auto`; checks it resumed."""
    killed = forked_train([*overrides, f"out={out}", f"callbacks=[{{_target_: fault_injection.KillAfterCheckpoint, step: {kill_after}}}]"],
                          out.parent / f"{out.name}-logs-killed", check=False)
    assert killed.returncode == -9, killed.output[-2000:]  # SIGKILL
    assert not (out / "projector.safetensors").exists()
    start = out.parent / f"{out.name}-start.txt"
    forked_train([*overrides, f"out={out}", "resume=auto", f"callbacks=[{{_target_: fault_injection.RecordStartStep, path: '{start}'}}]"],
                 out.parent / f"{out.name}-logs-resumed")
    assert start.read_text() == str(resumed_from)  # resumed from that checkpoint, not started over


def _assert_same_training(straight: Path, resumed: Path, stage: int) -> None:
    first, second = _trained_tensors(straight), _trained_tensors(resumed)
    assert first.keys() == second.keys() and any(k.startswith("adapter.") for k in first) == (stage == 2)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_killed_run_resumes_to_the_same_weights(stage, tiny_two_stage_run, tmp_path):
    """The shared two-stage run (stage 2: LoRA with dropout 0.1) repeated, kill -9 after step 4 (step 3's
    checkpoint on disk), then resume=auto: bit-identical to the run never interrupted."""
    checkpoints = tiny_two_stage_run.checkpoints
    overrides = [*TWO_STAGE_OVERRIDES[stage], f"checkpoints_dir={checkpoints}"]
    if stage == 2:
        overrides.append(f"stage2.projector={checkpoints / 'tiny-stage1' / 'projector.safetensors'}")
    _killed_and_resumed(overrides, tmp_path / "killed", kill_after=4, resumed_from=3)
    _assert_same_training(checkpoints / f"tiny-stage{stage}", tmp_path / "killed", stage)


@pytest.mark.slow
def test_killed_qlora_run_resumes_to_the_same_weights(two_stage_run, tmp_path):
    """The same for QLoRA (LoRA with dropout on the 4-bit NF4 decoder): bit-identical too."""
    overrides = ["stage=2", "model=tiny", "stage2.llm=qlora", "stage2.lora.dropout=0.1", "trainer.max_steps=4", "checkpoint_every=2",
                 "diagnostics.every=0", "data.limit=64", f"data.demo_dir={two_stage_run / 'demo-data'}",
                 f"stage2.projector={two_stage_run / 'tiny-stage1' / 'projector.safetensors'}",
                 f"checkpoints_dir={tmp_path}"]
    forked_train([*overrides, f"out={tmp_path / 'straight'}"], tmp_path / "logs-straight")
    _killed_and_resumed(overrides, tmp_path / "killed", kill_after=3, resumed_from=2)
    _assert_same_training(tmp_path / "straight", tmp_path / "killed", stage=2)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.batching=packed", "data.pack_length=1024", "data.batch_size=2"],
        ["data.batching=length_grouped"],
        ["encoder_cache.enabled=true", "loss_chunk_size=64"],
    ],
    ids=["packed", "length-grouped", "cache+chunked-loss"],
)
def test_performance_options_train(overrides, tmp_path):
    cfg = compose_train(
        ["stage=1", "model=tiny", "trainer.max_steps=3", "data.limit=64", "stage1.align_steps=20", f"out={tmp_path / 'run'}",
         f"checkpoints_dir={tmp_path}", *overrides]
    )
    summary = train(cfg)
    assert summary.steps == 3 and summary.nonfinite_skipped_steps == 0
    if "encoder_cache.enabled=true" in overrides:
        assert list((tmp_path / "encoder-cache").glob("*/shard-*.safetensors"))


def test_stage1_fits_the_summary_statistics_on_the_training_proteins(tmp_path):
    from protein_llava.evaluation.probe import load_labelled_proteins, pooled_features

    cfg = compose_train(
        ["stage=1", "model=tiny", "trainer.max_steps=1", "data.limit=24", "stage1.align_steps=0", "diagnostics.every=0",
         "model.projector.summary_token=true", "model.projector.summary_standardize=true", f"checkpoints_dir={tmp_path}",
         f"out={tmp_path / 'run'}"]
    )
    train(cfg)
    exported = ProteinLLM.from_pretrained(tmp_path / "run" / "export")
    # The first 24 demo records (four per protein): the proteins the run trained on, and no held-out one.
    lines = (tmp_path / "demo-data" / "train.jsonl").read_text().splitlines()[:24]
    path = tmp_path / "first24.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proteins = sorted(set(load_labelled_proteins([str(path)]).residues))
    means = torch.from_numpy(pooled_features(exported.protein_encoder, proteins))
    torch.testing.assert_close(exported.projector.summary_center, means.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported.projector.summary_scale, means.std(0, unbiased=False), atol=1e-5, rtol=1e-4)


def test_corrupted_records_are_skipped_counted_and_the_rest_trains(tmp_path, caplog):
    good = {"instruction": "Describe.", "input": "<seq> M K T A Y I A K </seq>", "output": "A kinase."}
    lines = []
    for i in range(60):
        if i % 6 == 1:
            lines.append("{broken json")
        elif i % 6 == 3:
            lines.append(json.dumps({**good, "input": "<seq> M K * T </seq>"}))
        elif i % 6 == 5:
            lines.append(json.dumps({"instruction": "Describe.", "input": "x"}))
        else:
            lines.append(json.dumps({**good, "output": f"Protein {i}."}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines))
    cfg = compose_train(["stage=1", "model=tiny", "data=local", f"data.path={data}", "trainer.max_steps=2", f"out={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING, logger="protein_llava"):
        summary = train(cfg)
    assert summary.data.kept == 30
    # Every record carries the same protein, so the swap diagnostics cannot run, and the run says so.
    assert any("interface diagnostics off" in r.getMessage() and "1 distinct protein" in r.getMessage() for r in caplog.records)
    assert summary.data.skipped == {"bad_json": 10, "invalid_residue": 10, "missing_field": 10}
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert any("data.jsonl:2" in example for example in report["train"]["examples"]["bad_json"])
    strict = compose_train(["stage=1", "model=tiny", "data=local", f"data.path={data}", "data.strict=true", f"out={tmp_path / 'strict'}"])
    from protein_llava.data.records import RecordError

    with pytest.raises(RecordError, match="data.jsonl:2"):
        train(strict)
