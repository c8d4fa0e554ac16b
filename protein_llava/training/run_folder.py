"""A training run's folder: its layout, spelt once, and what is read back from it.

`train()` writes through `RunFolder` (projector, adapters, Lightning checkpoints, logs, plots, export/) and
`protein-llava export` reads through it (summary, data report, the composed config, the stage-1 run of a
stage-2 run, the model card's training rows). See `checkpoints/README.md` for the layout as users see it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..model.modeling import ProteinLLM
from .checkpointing import PROJECTOR_FILE
from .summary import DataReport, RunSummary

LOGS = "logs"  # the CSV / TensorBoard logger's folder inside the run


@dataclass(frozen=True)
class RunFolder:
    """`<out>` of one `train.py` run."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def projector(self) -> Path:
        return self.path / PROJECTOR_FILE

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def encoder_adapter(self) -> Path:
        return self.path / "encoder_adapter"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def lightning(self) -> Path:
        """Full Lightning checkpoints, for `resume=auto`."""
        return self.path / "lightning"

    @property
    def metrics_csv(self) -> Path:
        return self.path / LOGS / "metrics.csv"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def diagnostics_plot(self) -> Path:
        return self.path / "diagnostics.png"

    @property
    def config_file(self) -> Path:
        """The composed Hydra config (configs/train/train.yaml puts Hydra's output in `<out>/hydra`)."""
        return self.path / "hydra" / ".hydra" / "config.yaml"

    def summary(self) -> RunSummary | None:
        return RunSummary.read(self.path)

    def data_report(self) -> DataReport | None:
        return DataReport.read(self.path)

    def config(self):
        """The run's config as a typed TrainConfig, or None when the folder has none; ValueError naming the
        file when it does not read as one."""
        from .config import read_run_config

        if not self.config_file.is_file():
            return None
        try:
            return read_run_config(self.config_file)
        except Exception as error:  # omegaconf's validation errors: name the file, not a traceback
            raise ValueError(f"{self.config_file} does not read as a train config: {error}") from error

    def is_stage1(self) -> bool:
        summary = self.summary()
        return summary is not None and summary.stage == 1


def save_adapters(model: nn.Module, folder: Path) -> None:
    """The LoRA adapters of a PEFT-wrapped decoder (`folder/adapter`) and encoder (`folder/encoder_adapter`),
    where there are any; both the run folder and an unmerged export hold them."""
    language_model = model.language_model if isinstance(model, ProteinLLM) else model
    if hasattr(language_model, "peft_config"):
        with warnings.catch_warnings():
            # peft looks for the base model's config.json to tell whether the vocabulary was resized; a
            # decoder loaded from a GGUF file (SmolLM2 of the demo) has none, and training never resizes it.
            warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary")
            language_model.save_pretrained(Path(folder) / "adapter")
    if isinstance(model, ProteinLLM) and hasattr(model.protein_encoder.esm, "peft_config"):
        model.protein_encoder.esm.save_pretrained(Path(folder) / "encoder_adapter")


def find_stage1_run(run: RunFolder, config, given: Path | None) -> RunFolder | None:
    """The stage-1 run of a stage-2 run: `given`, else the folder of the stage-2 config's projector, else
    `<model name>-stage1` beside the run or under its checkpoints_dir. None when none holds a stage-1 summary;
    a `given` folder without one raises FileNotFoundError."""
    if given is not None:
        if not RunFolder(given).is_stage1():
            raise FileNotFoundError(f"--stage1-run {given} holds no stage-1 summary.json")
        return RunFolder(given)
    candidates = []
    if config is not None:
        from .config import default_run_name

        if config.stage2.projector:
            candidates.append(Path(config.stage2.projector).parent)
        name = default_run_name(config.model.name, 1)
        candidates += [run.path.parent / name, Path(config.checkpoints_dir) / name]
    return next((RunFolder(candidate) for candidate in candidates if RunFolder(candidate).is_stage1()), None)


def stage_card_rows(run: RunFolder, summary: RunSummary, config) -> dict[str, str]:
    """The model card's rows of one stage, from its typed summary and (when the folder has it) its config."""
    from ..quantization import describe_qlora

    stage = summary.stage
    settings = None if config is None else (config.stage1 if stage == 1 else config.stage2)
    if summary.steps is not None:
        steps_text = f"{summary.steps} steps"
    else:
        steps_text = f"max_steps {(config.trainer.max_steps or settings.max_steps) if config else '?'}"
    if stage == 1:
        title, trains = "stage 1 (projector alignment)", "trains the projector; encoder and decoder frozen"
    else:
        llm = settings.llm if settings else "?"
        decoder = f"decoder {llm}" + (f" (r {settings.lora.r}, alpha {settings.lora.alpha})" if llm in ("lora", "qlora") else "")
        if llm == "qlora":
            qlora = settings.qlora
            decoder += " " + describe_qlora(
                double_quant=qlora.double_quant,
                compute_dtype=qlora.compute_dtype or config.model.resolved_dtype(),
                merged=config.export.merge_adapter,
            )
        elif llm == "lora":
            decoder += ", merged into the weights" if config.export.merge_adapter else ", adapter in adapter/"
        encoder = f"encoder {settings.encoder if settings else '?'}"
        title, trains = "stage 2 (instruction tuning)", f"projector trained, {decoder}, {encoder}"
    details = [f"run `{summary.run}`", steps_text]
    if settings is not None:
        details.append(f"lr {settings.lr:g}")
    rows = {title: ", ".join(details) + f"; {trains}"}
    report = run.data_report()
    data = report.train if report is not None else summary.data
    if data is not None:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(data.skipped.items()))
        rows[f"{title}: data"] = f"{data.kept} of {data.seen} records kept" + (f" (skipped: {skipped})" if skipped else "")
    if summary.final_train_loss is not None:
        rows[f"{title}: final train loss"] = f"{summary.final_train_loss:.4f}"
    return rows


def training_card_rows(run: RunFolder, stage1_run: RunFolder | None) -> dict[str, str]:
    """The model card's training table: one row per stage, its data counts and loss, and the data source.
    FileNotFoundError when `run` is not a finished run (no summary.json)."""
    summary = run.summary()
    if summary is None:
        raise FileNotFoundError(f"{run.path}/summary.json is missing: is {run.path} a finished training run?")
    config = run.config()
    rows = {}
    if summary.stage == 2:
        if stage1_run is not None:
            rows.update(stage_card_rows(stage1_run, stage1_run.summary(), stage1_run.config()))
        else:
            rows["stage 1 (projector alignment)"] = "run not found (export --stage1-run DIR names it)"
    rows.update(stage_card_rows(run, summary, config))
    if config is not None:
        model, data = config.model, config.data
        rows["preset"] = f"{model.preset} (decoder: {model.decoder or 'preset default'}, encoder weights: {model.encoder_weights or 'random-init'})"
        where = {"demo": "the embedded demo set", "hub": data.hub_name, "local": data.path}
        rows["data source"] = f"{data.source}: {where.get(data.source, data.path)}"
    return rows


__all__ = ["RunFolder", "find_stage1_run", "save_adapters", "stage_card_rows", "training_card_rows"]
