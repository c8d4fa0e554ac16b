"""One training run from a composed config: `python train.py stage=1|2 [overrides]` calls `train(cfg)`.

Order: resolve the config into a plan (`plan.resolve_plan`: values, files, packages; cheap), then build the
model, the data and the trainer, fit, and write the run's outputs (projector / adapter, export folder, data
report, loss curve, summary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from ..builders import build_preset, load_decoder
from ..data.demo import ensure_demo_dataset
from ..data.records import RecordReport, read_conversations
from ..data.tokenize import ConversationTokenizer
from ..loading import DTYPES
from ..model.modeling import ProteinLLM
from .checkpointing import AtomicCheckpointIO, load_projector, save_projector
from .config import TrainConfig
from .run_folder import LOGS, RunFolder, save_adapters
from .console import StageProgressBar, quiet_lightning
from .datamodule import SFTDataModule
from .export import export_run
from .launch import resolve_launch
from .plan import TrainPlan, resolve_plan
from .alignment import align_projector_to_residues, encode_proteins_frozen, fit_summary_statistics
from .diagnostics import InterfaceDiagnostics
from .plots import plot_diagnostics, plot_loss_curve
from .stage import StageModule, apply_stage_spec
from .summary import DataCounts, DataReport, RunSummary

log = logging.getLogger(__name__)


def diagnostics_path(config: TrainConfig) -> str:
    """The records the interface diagnostics measure (see `DiagnosticsSettings.path`)."""
    data = config.data
    if config.diagnostics.path is not None:
        return config.diagnostics.path
    if data.source == "demo" and data.path is None:
        return str(ensure_demo_dataset(data.demo_dir, seed=data.demo_seed, num_train=data.demo_num_train, num_heldout=data.demo_num_heldout)["heldout"])
    return str(data.val_path or data_paths(config)[0])


def build_diagnostics(config: TrainConfig, conversation_tokenizer, pad_token_id: int, processor) -> InterfaceDiagnostics | None:
    """The interface-diagnostics callback bound to the run's tokenizer, or None when `diagnostics.every=0`."""
    settings = config.diagnostics
    if settings.every == 0:
        return None
    path, data = diagnostics_path(config), config.data
    hub = {"name": data.hub_name, "split": data.hub_split} if data.source == "hub" and path == data.path else {}
    # Read a bounded prefix: a training file can be large, and only records with a protein are measured.
    conversations = read_conversations(path, RecordReport(), limit=20 * settings.num_records, **hub)
    conversations = [c for c in conversations if c.proteins][: settings.num_records]
    distinct = len({p for c in conversations for p in c.proteins})
    if distinct < 2:
        # A swap needs two proteins; refusing to train over a missing measurement would be worse than saying so.
        log.warning(
            "interface diagnostics off: the first %d protein records of %s hold %d distinct protein(s), and the swap "
            "needs 2; point diagnostics.path at held-out records with varied proteins, or set diagnostics.every=0",
            len(conversations), path, distinct,
        )
        return None
    callback = InterfaceDiagnostics(conversations, every=settings.every)
    callback.bind(conversation_tokenizer, pad_token_id, processor)
    return callback


def data_paths(config: TrainConfig) -> tuple[str, str | None]:
    """(train source, validation source); the demo source writes its files on first use."""
    data = config.data
    if data.source == "demo":
        paths = ensure_demo_dataset(data.demo_dir, seed=data.demo_seed, num_train=data.demo_num_train, num_heldout=data.demo_num_heldout)
        return str(data.path or paths["train"]), data.val_path
    return str(data.path), data.val_path


def build_model(plan: TrainPlan):
    """(model, processor or None, tokenizer): a ProteinLLM, or the bare decoder for the text-only arm."""
    config = plan.config
    model_settings = config.model
    quantization = plan.quantization_config()
    if model_settings.text_only:
        decoder, tokenizer = load_decoder(
            model_settings.preset, model_settings.decoder, plan.dtype, model_settings.attn_implementation, config.seed, quantization
        )
        return decoder, None, tokenizer
    model, processor = build_preset(
        model_settings.preset,
        decoder=model_settings.decoder,
        encoder_weights=model_settings.encoder_weights,
        dtype=plan.dtype,
        attn_implementation=model_settings.attn_implementation,
        seed=config.seed,
        overflow=config.data.overflow,
        projector=model_settings.projector.as_dict(),
        quantization_config=quantization,
        encoder_repr_layer=model_settings.encoder_repr_layer,
    )
    return model, processor, processor.tokenizer


def attach_representation_cache(config: TrainConfig, model, datamodule: SFTDataModule) -> None:
    """Fill the frozen-encoder cache with every protein of the run's data and make the collator read from it."""
    from .encoder_cache import RepresentationCache

    if not isinstance(model, ProteinLLM):
        raise ValueError("encoder_cache.enabled=true needs a multimodal model; the text-only arm has no encoder")
    if any(p.requires_grad for p in model.protein_encoder.parameters()):
        raise ValueError(f"encoder_cache.enabled=true needs a frozen encoder; it conflicts with stage2.encoder={config.stage2.encoder}")
    settings = config.encoder_cache
    cache = RepresentationCache(settings.dir, model.protein_encoder, dtype=DTYPES[settings.dtype])
    datamodule.setup("fit")
    device = "cuda" if torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    added = cache.add(datamodule.proteins(), batch_size=settings.batch_size, device=device)
    model.protein_encoder.to("cpu")
    log.info("encoder cache %s: %d proteins, %d computed now", cache.folder, len(cache), added)
    datamodule.collator.representation_cache = cache


def make_trainer(plan: TrainPlan, callbacks: Sequence[L.Callback] = (), validate: bool = True) -> L.Trainer:
    config, out = plan.config, plan.out
    checkpoint = ModelCheckpoint(
        dirpath=RunFolder(out).lightning,
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=config.checkpoint_every,
        monitor="step",
        mode="max",
        save_top_k=config.keep_checkpoints,
    )
    trainer = config.trainer
    strategy = _build_strategy(dict(trainer.strategy)) if isinstance(trainer.strategy, dict) else trainer.strategy
    return L.Trainer(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=strategy,
        precision=trainer.precision,
        max_steps=plan.max_steps,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        gradient_clip_val=trainer.gradient_clip_val,
        log_every_n_steps=trainer.log_every_n_steps,
        deterministic=trainer.deterministic,
        # No validation file: no validation loop (and no empty-loader warning).
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=None if validate else 0,
        callbacks=[checkpoint, StageProgressBar(refresh_rate=config.progress_every), *extra_callbacks(config), *callbacks],
        logger=_make_logger(config, out),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the datamodule shards by rank itself, resumably
        default_root_dir=str(out),
        enable_model_summary=False,
    )


def extra_callbacks(config: TrainConfig) -> list:
    """User callbacks from `callbacks: [{_target_: ...}]` (instantiated by Hydra's own instantiate)."""
    from hydra.utils import instantiate

    return [instantiate(spec) for spec in config.callbacks]


def _build_strategy(spec: dict):
    """The strategy object of `trainer.strategy: {name: fsdp, ...}` (configs/train/trainer/fsdp.yaml)."""
    name = spec.pop("name")
    if name == "fsdp":
        from .sharding import FSDP2Strategy

        return FSDP2Strategy(**spec)
    raise ValueError(f"unknown trainer.strategy.name {name!r}; choose fsdp (or a plain Lightning strategy string)")


def _make_logger(config: TrainConfig, out: Path):
    if config.logger == "csv":
        return CSVLogger(save_dir=str(out), name=LOGS, version="")
    if config.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(out), name=LOGS, version="")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(save_dir=str(out), name=config.run_name)


@runtime_checkable
class BindsToRun(Protocol):
    """A callback that needs the processor and tokenizer the run builds (the experiment's held-out scoring):
    `train()` hands them over before training starts."""

    def bind(self, processor, tokenizer) -> None: ...


def train(cfg: DictConfig | TrainConfig | TrainPlan, callbacks: Sequence[L.Callback] = ()) -> RunSummary:
    """Run one stage; returns its summary (also written to `out/summary.json` by rank 0).

    `callbacks`: Lightning callbacks built in Python (e.g. the experiment's held-out evaluation), besides the
    config's own; those that are `BindsToRun` get the run's processor and tokenizer.
    """
    started = time.perf_counter()
    plan = cfg if isinstance(cfg, TrainPlan) else resolve_plan(cfg)
    config, out = plan.config, plan.out
    launch = resolve_launch(config.trainer.devices, config.trainer.num_nodes)
    if launch.cluster != "local":
        log.info("%s", launch.describe())
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True)
    train_path, val_path = data_paths(config)

    model, processor, tokenizer = build_model(plan)
    for callback in callbacks:
        if isinstance(callback, BindsToRun):
            callback.bind(processor, tokenizer)
    if plan.projector is not None:
        load_projector(model, plan.projector)
    model = apply_stage_spec(model, plan.spec, config.stage2.lora)
    settings = config.stage_settings
    module = StageModule(
        model, plan.optim, config.gradient_checkpointing, config.loss_chunk_size,
        contrast_weight=settings.contrast_weight, contrast_margin=settings.contrast_margin,
    )

    conversation_tokenizer = ConversationTokenizer(processor, config.data.max_length, mode=plan.spec.loss_on, tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = config.data
    datamodule = SFTDataModule(
        train_path,
        conversation_tokenizer,
        pad_token_id=pad_id,
        processor=processor,
        val_path=val_path,
        batch_size=data.batch_size,
        seed=config.seed,
        strict=data.strict,
        limit=data.limit,
        hub_name=data.hub_name,
        hub_split=data.hub_split,
        batching=data.batching,
        pack_length=data.pack_length,
        swapped_copy=settings.contrast_weight > 0,
    )
    if config.encoder_cache.enabled:
        attach_representation_cache(config, model, datamodule)
    # Stage 1 only: a text-only model (stage 2) has no projector.
    standardize = config.stage == 1 and model.config.projector_config.summary_standardize
    if config.stage == 1 and plan.resume_from is None and (standardize or config.stage1.align_steps):
        # The projector's warm starts, before stage 1 proper; one frozen-encoder pass serves both, and each
        # logs its own fit. A resumed run has them in its checkpoint.
        datamodule.setup("fit")
        encoded = encode_proteins_frozen(model, processor, datamodule.proteins())
        if standardize:
            fit_summary_statistics(model, processor, datamodule.training_proteins(), encoded=encoded)
        if config.stage1.align_steps:
            align_projector_to_residues(
                model, processor, datamodule.proteins(), config.stage1.align_steps, lr=config.stage1.align_lr,
                seed=config.seed, encoded=encoded,
            )
        del encoded
    diagnostics = build_diagnostics(config, conversation_tokenizer, pad_id, processor)
    callbacks = [*callbacks, diagnostics] if diagnostics is not None else list(callbacks)
    with quiet_lightning():
        trainer = make_trainer(plan, callbacks, validate=val_path is not None)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=plan.resume_from)
        except torch.cuda.OutOfMemoryError as error:
            raise torch.cuda.OutOfMemoryError(
                f"GPU out of memory in {config.run_name}: lower data.batch_size (now {data.batch_size}) and raise "
                f"trainer.accumulate_grad_batches to keep the effective batch; with data.batching=packed lower "
                f"data.pack_length (now {data.pack_length}); set gradient_checkpointing=true; set loss_chunk_size=1024 "
                f"for large vocabularies; or use stage2.llm=qlora (4-bit decoder). Resume with resume=auto."
            ) from error

    summary = RunSummary(stage=config.stage, run=config.run_name, out=str(out), steps=trainer.global_step)
    trained = _unsharded(plan, module.model)
    if trainer.is_global_zero:
        _write_outputs(plan, summary, module, trained, processor, tokenizer, datamodule)
        summary.wall_seconds = round(time.perf_counter() - started, 1)
        summary.write(out)
    return summary


def _unsharded(plan: TrainPlan, model):
    """The trained model as one process holds it: `model` itself, or, after FSDP, a fresh unsharded copy on
    rank 0 holding the gathered weights (every rank takes part in the gather; the others get None)."""
    from .sharding import gather_full_state, is_sharded

    if not is_sharded(model):
        return model
    state = gather_full_state(model)
    if not state:
        return None
    copy, _, _ = build_model(plan)
    if plan.projector is not None:
        load_projector(copy, plan.projector)
    copy = apply_stage_spec(copy, plan.spec, plan.config.stage2.lora)
    copy.load_state_dict(state, strict=True)
    return copy


def _write_outputs(plan: TrainPlan, summary: RunSummary, module, model, processor, tokenizer, datamodule) -> None:
    run = RunFolder(plan.out)
    if isinstance(model, ProteinLLM):
        save_projector(model, run.projector)
    save_adapters(model, run.path)
    summary.data = DataCounts.from_dict(datamodule.report.to_dict())
    val = DataCounts.from_dict(datamodule.val_report.to_dict()) if plan.config.data.val_path else None
    DataReport(summary.data, val).write(run.path)
    log.debug("data:\n%s", datamodule.report.summary())
    summary.nonfinite_skipped_steps = module.guard.skipped
    summary.final_train_loss = module.last_train_loss
    if run.metrics_csv.is_file():
        plot_loss_curve(run.metrics_csv, run.loss_plot, title=plan.config.run_name)
        if plan.config.diagnostics.every:
            plot_diagnostics(run.metrics_csv, run.diagnostics_plot, title=plan.config.run_name)
    summary.export = str(export_run(model, processor, tokenizer, run.export, merge_adapter=plan.config.export.merge_adapter))
