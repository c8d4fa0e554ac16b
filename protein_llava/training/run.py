"""One training run from a composed config: `python train.py stage=1|2 [overrides]` calls `train(cfg)`.

Order: validate the config and check every file it names (cheap), then build the model, the data and the
trainer, fit, and write the run's outputs (projector / adapter, export folder, data report, loss curve).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from ..builders import build_preset, load_decoder
from ..data.demo import ensure_demo_dataset
from ..data.tokenize import ConversationTokenizer
from ..modeling import ProteinLLM
from ..configuration import ProteinLLMConfig
from .checkpointing import (
    PROJECTOR_FILE,
    AtomicCheckpointIO,
    check_projector_file,
    load_projector,
    resolve_resume,
    save_projector,
)
from .datamodule import SFTDataModule
from .export import export_run
from .heldout import HeldOutEvaluation
from .optim import OptimConfig
from .plots import plot_loss_curve
from .stage1 import Stage1Module
from .stage2 import LoraSettings, Stage2Module, apply_stage2_training

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_config(cfg: DictConfig) -> None:
    """Reject bad values and missing files with one message naming the key, before any model is loaded."""
    if cfg.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {cfg.stage!r}")
    if cfg.model.text_only and cfg.stage == 1:
        raise ValueError("model=text-only has no projector to align: run it as stage=2")
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.model.dtype!r}")
    if cfg.model.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ImportError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU "
                "(pip install flash-attn --no-build-isolation); use model.attn_implementation=sdpa otherwise"
            )
    if cfg.data.path is not None and not Path(cfg.data.path).exists() and cfg.data.source == "local":
        raise FileNotFoundError(f"data.path={cfg.data.path}: no such file")
    if cfg.data.val_path is not None and not Path(cfg.data.val_path).exists():
        raise FileNotFoundError(f"data.val_path={cfg.data.val_path}: no such file")
    if cfg.data.batching == "packed" and (cfg.data.pack_length is None or cfg.data.pack_length < cfg.data.max_length):
        raise ValueError(
            f"data.batching=packed needs data.pack_length >= data.max_length ({cfg.data.max_length}), "
            f"got {cfg.data.pack_length}"
        )
    if cfg.model.decoder is not None and not Path(cfg.model.decoder).exists():
        raise FileNotFoundError(f"model.decoder={cfg.model.decoder}: no such folder")
    if cfg.stage == 2 and not cfg.model.text_only:
        projector = stage1_projector_path(cfg)
        if not projector.is_file():
            key = "stage2.projector" if cfg.stage2.projector is not None else "the default stage-1 projector"
            raise FileNotFoundError(
                f"{key} {projector}: no such file. Run `python train.py stage=1` with the same model first "
                f"(it writes {PROJECTOR_FILE} in its run folder), or set stage2.projector=PATH."
            )
        check_projector_file(projector, expected_model_config(cfg))
    if cfg.stage == 2 and cfg.stage2.llm == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ImportError("stage2.llm=qlora needs bitsandbytes: pip install bitsandbytes==0.50.2") from error
        compute = cfg.stage2.qlora.compute_dtype
        if compute is not None and compute not in DTYPES:
            raise ValueError(f"stage2.qlora.compute_dtype must be null or one of {sorted(DTYPES)}, got {compute!r}")
    resolve_resume(cfg.resume, Path(cfg.out) / "lightning")
    optim_config(cfg)  # validates the stage's optimisation settings


def data_paths(cfg: DictConfig) -> tuple[str, str | None]:
    """(train source, validation source); the demo source writes its files on first use."""
    if cfg.data.source == "demo":
        paths = ensure_demo_dataset(
            cfg.data.demo_dir, seed=cfg.data.demo_seed, num_train=cfg.data.demo_num_train, num_heldout=cfg.data.demo_num_heldout
        )
        return str(cfg.data.path or paths["train"]), cfg.data.val_path
    if cfg.data.source in ("local", "hub"):
        if cfg.data.path is None:
            raise ValueError(f"data.source={cfg.data.source} needs data.path")
        return str(cfg.data.path), cfg.data.val_path
    raise ValueError(f"data.source must be demo, local or hub; got {cfg.data.source!r}")


def build_model(cfg: DictConfig):
    """(model, processor or None, tokenizer): a ProteinLLM, or the bare decoder for the text-only arm."""
    dtype = DTYPES[cfg.model.dtype]
    attn = cfg.model.attn_implementation
    quantization = qlora_config(cfg)
    if cfg.model.text_only:
        decoder, tokenizer = load_decoder(cfg.model.preset, cfg.model.decoder, dtype, attn, cfg.seed, quantization)
        return decoder, None, tokenizer
    model, processor = build_preset(
        cfg.model.preset,
        decoder=cfg.model.decoder,
        encoder_weights=cfg.model.encoder_weights,
        dtype=dtype,
        attn_implementation=attn,
        seed=cfg.seed,
        overflow=cfg.data.overflow,
        projector=projector_overrides(cfg),
        quantization_config=quantization,
    )
    return model, processor, processor.tokenizer


def qlora_config(cfg: DictConfig):
    """The 4-bit NF4 config of a `stage2.llm=qlora` run (None for every other run)."""
    if cfg.stage != 2 or cfg.stage2.llm != "qlora":
        return None
    from ..quantization import nf4_config

    settings = cfg.stage2.qlora
    compute = DTYPES[settings.compute_dtype or cfg.model.dtype]
    if not torch.cuda.is_available():
        log.warning(
            "stage2.llm=qlora on CPU: training on CPU is slow, and 4-bit makes it no faster (each 4-bit layer "
            "de-quantises its weight before every matmul; ~1.1x the step time of stage2.llm=lora measured on "
            "SmolLM2-135M). It saves memory only: use it to test the QLoRA path, or to fit a small decoder in "
            "RAM; train real models on a CUDA GPU."
        )
    return nf4_config(compute, double_quant=settings.double_quant)


def projector_overrides(cfg: DictConfig) -> dict:
    """The model group's `projector:` settings (e.g. token_reduction, pool_stride) that replace the preset's."""
    projector = cfg.model.get("projector")
    return {} if projector is None else dict(OmegaConf.to_container(projector, resolve=True))


OPTIM_KEYS = ("lr", "weight_decay", "warmup_steps", "max_nonfinite_in_a_row")


def stage_settings(cfg: DictConfig) -> DictConfig:
    return cfg.stage1 if cfg.stage == 1 else cfg.stage2


def max_steps(cfg: DictConfig) -> int:
    return cfg.trainer.max_steps if cfg.trainer.max_steps is not None else stage_settings(cfg).max_steps


def optim_config(cfg: DictConfig) -> OptimConfig:
    settings = stage_settings(cfg)
    return OptimConfig(total_steps=max_steps(cfg), **{key: settings[key] for key in OPTIM_KEYS})


def expected_model_config(cfg: DictConfig) -> ProteinLLMConfig:
    """The config the run's model will have, read without loading weights (for checks before the heavy load)."""
    config = ProteinLLMConfig.from_preset(cfg.model.preset).with_projector(**projector_overrides(cfg))
    if cfg.model.decoder is not None:
        from transformers import AutoConfig

        config.text_config = AutoConfig.from_pretrained(cfg.model.decoder)
    return config


def stage1_projector_path(cfg: DictConfig) -> Path:
    if cfg.stage2.projector is not None:
        return Path(cfg.stage2.projector)
    return Path(cfg.checkpoints_dir) / f"{cfg.model.name}-stage1" / PROJECTOR_FILE


def attach_representation_cache(cfg: DictConfig, model, datamodule: SFTDataModule) -> None:
    """Fill the frozen-encoder cache with every protein of the run's data and make the collator read from it."""
    from ..encoder_cache import RepresentationCache

    if not isinstance(model, ProteinLLM):
        raise ValueError("encoder_cache.enabled=true needs a multimodal model; the text-only arm has no encoder")
    if any(p.requires_grad for p in model.protein_encoder.parameters()):
        raise ValueError(f"encoder_cache.enabled=true needs a frozen encoder; it conflicts with stage2.encoder={cfg.stage2.encoder}")
    cache = RepresentationCache(cfg.encoder_cache.dir, model.protein_encoder, dtype=DTYPES[cfg.encoder_cache.dtype])
    datamodule.setup("fit")
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    added = cache.add(datamodule.proteins(), batch_size=cfg.encoder_cache.batch_size, device=device)
    model.protein_encoder.to("cpu")
    log.info("encoder cache %s: %d proteins, %d computed now", cache.folder, len(cache), added)
    datamodule.collator.representation_cache = cache


def make_trainer(cfg: DictConfig, out: Path, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    checkpoint = ModelCheckpoint(
        dirpath=out / "lightning",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every,
        monitor="step",
        mode="max",
        save_top_k=cfg.keep_checkpoints,
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["max_steps"] = max_steps(cfg)
    strategy = trainer_kwargs.pop("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = _build_strategy(strategy)
    return L.Trainer(
        **trainer_kwargs,
        strategy=strategy,
        callbacks=[checkpoint, TQDMProgressBar(refresh_rate=cfg.progress_every), *extra_callbacks(cfg), *callbacks],
        logger=_make_logger(cfg, out),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the datamodule shards by rank itself, resumably
        default_root_dir=str(out),
        enable_model_summary=False,
    )


def extra_callbacks(cfg: DictConfig) -> list:
    """User callbacks from `callbacks: [{_target_: ...}]` (instantiated by Hydra's own instantiate)."""
    from hydra.utils import instantiate

    return [instantiate(spec) for spec in cfg.callbacks]


def _build_strategy(spec: dict):
    """Strategy objects for the ready-made FSDP / DeepSpeed configs."""
    name = spec.pop("name")
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(**spec)
    if name == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(**spec)
    raise ValueError(f"unknown trainer.strategy.name {name!r}; choose fsdp or deepspeed (or a plain string)")


def _make_logger(cfg: DictConfig, out: Path):
    if cfg.logger == "csv":
        return CSVLogger(save_dir=str(out), name="logs", version="")
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(out), name="logs", version="")
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(save_dir=str(out), name=cfg.run_name)
    raise ValueError(f"logger must be csv, tensorboard or wandb; got {cfg.logger!r}")


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Run one stage; returns a summary (also written to `out/summary.json`).

    `callbacks`: Lightning callbacks built in Python (e.g. held-out evaluation), besides the config's own.
    """
    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    train_path, val_path = data_paths(cfg)
    optim = optim_config(cfg)

    model, processor, tokenizer = build_model(cfg)
    for callback in callbacks:
        if isinstance(callback, HeldOutEvaluation):
            callback.bind(processor, tokenizer)
    if cfg.stage == 1:
        module = Stage1Module(model, optim, cfg.gradient_checkpointing, cfg.loss_chunk_size)
    else:
        if isinstance(model, ProteinLLM):
            load_projector(model, stage1_projector_path(cfg))
        lora = LoraSettings(**OmegaConf.to_container(cfg.stage2.lora, resolve=True))
        model = apply_stage2_training(model, cfg.stage2.llm, lora, encoder=cfg.stage2.encoder)
        module = Stage2Module(model, optim, cfg.gradient_checkpointing, cfg.loss_chunk_size)

    conversation_tokenizer = ConversationTokenizer(
        processor, cfg.data.max_length, mode="caption" if cfg.stage == 1 else "sft", tokenizer=tokenizer
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    datamodule = SFTDataModule(
        train_path,
        conversation_tokenizer,
        pad_token_id=pad_id,
        processor=processor,
        val_path=val_path,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        strict=cfg.data.strict,
        limit=cfg.data.limit,
        hub_name=cfg.data.hub_name,
        hub_split=cfg.data.hub_split,
        batching=cfg.data.batching,
        pack_length=cfg.data.pack_length,
    )
    if cfg.encoder_cache.enabled:
        attach_representation_cache(cfg, model, datamodule)
    trainer = make_trainer(cfg, out, callbacks)
    ckpt_path = resolve_resume(cfg.resume, out / "lightning")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except torch.cuda.OutOfMemoryError as error:
        raise torch.cuda.OutOfMemoryError(
            f"GPU out of memory in {cfg.run_name}: lower data.batch_size (now {cfg.data.batch_size}) and raise "
            f"trainer.accumulate_grad_batches to keep the effective batch; with data.batching=packed lower "
            f"data.pack_length (now {cfg.data.pack_length}); set gradient_checkpointing=true; set loss_chunk_size=1024 "
            f"for large vocabularies; or use stage2.llm=qlora (4-bit decoder). Resume with resume=auto."
        ) from error

    summary = {"stage": cfg.stage, "run": cfg.run_name, "steps": trainer.global_step, "out": str(out)}
    if trainer.is_global_zero:
        summary.update(_write_outputs(cfg, out, module, processor, tokenizer, datamodule))
    return summary


def _write_outputs(cfg, out: Path, module, processor, tokenizer, datamodule) -> dict:
    model = module.model
    if isinstance(model, ProteinLLM):
        save_projector(model, out / PROJECTOR_FILE)
    language_model = model.language_model if isinstance(model, ProteinLLM) else model
    if hasattr(language_model, "peft_config"):
        language_model.save_pretrained(out / "adapter")
    if isinstance(model, ProteinLLM) and hasattr(model.protein_encoder.esm, "peft_config"):
        model.protein_encoder.esm.save_pretrained(out / "encoder_adapter")
    datamodule.write_report(out / "data_report.json")
    log.info("data:\n%s", datamodule.report.summary())
    print(datamodule.report.summary())
    metrics_csv = out / "logs" / "metrics.csv"
    outputs = {"nonfinite_skipped_steps": module.guard.skipped, "data": datamodule.report.to_dict()}
    if metrics_csv.is_file():
        plot_loss_curve(metrics_csv, out / "loss.png", title=f"{cfg.run_name}")
        outputs["final_train_loss"] = _last_metric(metrics_csv, "train/loss")
    export_dir = export_run(model, processor, tokenizer, out / "export", merge_adapter=cfg.export.merge_adapter)
    outputs["export"] = str(export_dir)
    steps = module.trainer.global_step
    (out / "summary.json").write_text(json.dumps({"stage": cfg.stage, "run": cfg.run_name, "steps": steps, **outputs}, indent=2))
    return outputs


def _last_metric(metrics_csv: Path, name: str) -> float | None:
    import csv

    value = None
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row.get(name):
                value = float(row[name])
    return value
