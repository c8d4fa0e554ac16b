"""A composed train config resolved once into what `run.train` does: checked, with every derived value.

`resolve_plan` is cheap (no weights load): it turns the config into objects (each dataclass checks its own
values), then checks what needs the machine or the disk, naming the key: files and folders it names, the
stage-1 projector's shape, optional packages (flash-attn, bitsandbytes), the resume checkpoint.
"""

from __future__ import annotations

import dataclasses

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from omegaconf import DictConfig

from ..model.configuration import ProteinLLMConfig
from ..loading import DTYPES
from .checkpointing import PROJECTOR_FILE, check_projector_file, resolve_resume
from .config import TrainConfig, default_run_name, to_train_config
from .optim import OptimConfig
from .run_folder import RunFolder
from .stage import STAGE1, StageSpec, stage2_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPlan:
    """Everything one run needs, decided before anything heavy happens.

    Fields:
        config: the typed config. spec: what trains and what the loss covers. optim: the stage's optimizer
        and schedule (total_steps = the run's max_steps). out: the run folder. projector: stage 1's
        projector that stage 2 starts from (None otherwise). resume_from: the Lightning checkpoint to resume.
    """

    config: TrainConfig
    spec: StageSpec
    optim: OptimConfig
    out: Path
    projector: Path | None
    resume_from: str | None

    @property
    def stage(self) -> int:
        return self.config.stage

    @property
    def max_steps(self) -> int:
        return self.optim.total_steps

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config.model.resolved_dtype()]

    def quantization_config(self):
        """The 4-bit NF4 config of a `stage2.llm=qlora` run (None for every other run)."""
        if self.spec.llm != "qlora":
            return None
        from ..quantization import nf4_config

        settings = self.config.stage2.qlora
        return nf4_config(DTYPES[settings.compute_dtype or self.config.model.resolved_dtype()], double_quant=settings.double_quant)


def stage_spec(config: TrainConfig) -> StageSpec:
    if config.stage == 1:
        spec = dataclasses.replace(STAGE1, loss_on=config.stage1.loss_on)
    else:
        spec = stage2_spec(config.stage2.llm, config.stage2.encoder, loss_on=config.stage2.loss_on)
    spec.check_model(multimodal=not config.model.text_only)
    return spec


def optim_config(config: TrainConfig) -> OptimConfig:
    settings, key = config.stage_settings, f"stage{config.stage}"
    try:
        return OptimConfig(
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            warmup_steps=settings.warmup_steps,
            total_steps=config.max_steps,
            max_nonfinite_in_a_row=settings.max_nonfinite_in_a_row,
            projector_lr=getattr(settings, "projector_lr", None),
            summary_lr=getattr(settings, "summary_lr", None),
        )
    except ValueError as error:
        raise ValueError(f"{key}.{error}") from error


def expected_model_config(config: TrainConfig) -> ProteinLLMConfig:
    """The config the run's model will have, read without loading weights (for checks before the heavy load)."""
    model_config = ProteinLLMConfig.from_preset(config.model.preset).with_projector(**config.model.projector.as_dict())
    if config.model.decoder is not None:
        from transformers import AutoConfig

        model_config.text_config = AutoConfig.from_pretrained(config.model.decoder)
    return model_config


def stage1_projector_path(config: TrainConfig) -> Path:
    if config.stage2.projector is not None:
        return Path(config.stage2.projector)
    return Path(config.checkpoints_dir) / default_run_name(config.model.name, 1) / PROJECTOR_FILE


def _check_environment(config: TrainConfig, spec: StageSpec) -> None:
    model, data = config.model, config.data
    if model.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ImportError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU "
                "(pip install flash-attn --no-build-isolation); use model.attn_implementation=sdpa otherwise"
            )
    if data.path is not None and data.source == "local" and not Path(data.path).exists():
        raise FileNotFoundError(f"data.path={data.path}: no such file")
    if data.val_path is not None and not Path(data.val_path).exists():
        raise FileNotFoundError(f"data.val_path={data.val_path}: no such file")
    if model.decoder is not None and not Path(model.decoder).exists():
        raise FileNotFoundError(f"model.decoder={model.decoder}: no such folder")
    if spec.llm == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ImportError("stage2.llm=qlora needs bitsandbytes: pip install bitsandbytes==0.50.2") from error
        if not torch.cuda.is_available():
            log.warning(
                "stage2.llm=qlora on CPU: training on CPU is slow, and 4-bit makes it no faster (each 4-bit layer "
                "de-quantises its weight before every matmul; ~1.1x the step time of stage2.llm=lora measured on "
                "SmolLM2-135M). It saves memory only: use it to test the QLoRA path, or to fit a small decoder in "
                "RAM; train real models on a CUDA GPU."
            )


def resolve_plan(cfg: DictConfig | TrainConfig) -> TrainPlan:
    """Check `cfg` (values, files, packages) and derive the run's plan; raises naming the key at fault."""
    config = to_train_config(cfg)
    spec = stage_spec(config)
    optim = optim_config(config)
    if config.stage2.align_steps:
        raise ValueError("stage2.align_steps: residue alignment is a warm start of stage 1's projector; set stage1.align_steps")
    if config.stage == 1 and config.stage1.align_steps and config.model.text_only:
        raise ValueError("stage1.align_steps needs a multimodal model")
    _check_environment(config, spec)
    if not config.model.text_only:
        try:  # the projector overrides, checked by ProjectorConfig itself before anything loads
            ProteinLLMConfig.from_preset(config.model.preset).with_projector(**config.model.projector.as_dict())
        except (ValueError, StrictDataclassClassValidationError) as error:
            # The strict-dataclass wrapper's text is a traceback-like block; its cause is the one line.
            cause = error.__cause__ if isinstance(error, StrictDataclassClassValidationError) else error
            raise ValueError(f"model.projector: {cause}") from error
    projector = None
    if config.stage == 2 and not config.model.text_only:
        projector = stage1_projector_path(config)
        if not projector.is_file():
            key = "stage2.projector" if config.stage2.projector is not None else "the default stage-1 projector"
            raise FileNotFoundError(
                f"{key} {projector}: no such file. Run `python train.py stage=1` with the same model first "
                f"(it writes {PROJECTOR_FILE} in its run folder), or set stage2.projector=PATH."
            )
        check_projector_file(projector, expected_model_config(config))
    out = Path(config.out)
    resume_from = resolve_resume(config.resume, RunFolder(out).lightning)
    return TrainPlan(config=config, spec=spec, optim=optim, out=out, projector=projector, resume_from=resume_from)
