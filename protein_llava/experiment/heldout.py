"""Held-out accuracy during training: a Lightning callback that scores benchmark items at fixed steps.

A loss curve going down shows only that the model fits its training data; the learning experiment needs
accuracy on held-out proteins against the step. At each step in `steps` the callback puts the model in
eval mode, scores the items exactly as `eval.py` would (the same `evaluate_arm`, in `description` mode by
default), records accuracy per question type, and restores each submodule's train/eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
from torch import nn

from ..evaluation.benchmarks import BenchmarkItem
from ..evaluation.config import EvalConfig
from ..evaluation.report import accuracy_by_type
from ..evaluation.runner import evaluate_arm
from ..loading import LoadedModel, ensure_pad_token


@dataclass(eq=False)  # callbacks are compared by identity
class HeldOutEvaluation(L.Callback):
    """Score `items` (and, at the last step, `ablated_items`) with the model in training.

    Args:
        name: the arm's name in the records. items: held-out benchmark items. steps: global steps to score
            at (0 = before the first step); `step_offset` is added when recording, so a stage-2 run can
            continue the step axis of stage 1. processor / tokenizer: what feeds the model (processor None
            for the text-only arm). mode: the `EvalConfig.mode` to score with.
    """

    name: str
    items: Sequence[BenchmarkItem]
    steps: Sequence[int]
    tokenizer: object = None
    processor: object = None
    ablated_items: Sequence[BenchmarkItem] = ()
    final_step: int | None = None
    step_offset: int = 0
    mode: str = "description"
    batch_size: int = 8
    seed: int = 0
    records: list[dict] = field(default_factory=list)
    final_predictions: dict[str, dict[str, dict]] = field(default_factory=dict)

    def __post_init__(self):
        super().__init__()
        self._config = EvalConfig(model="(in training)", baseline=None, mode=self.mode, batch_size=self.batch_size, progress=False)

    def bind(self, processor, tokenizer) -> None:
        """The run's processor (None for the text-only arm) and tokenizer; `train()` calls this once it built them."""
        self.processor, self.tokenizer = processor, tokenizer
        ensure_pad_token(tokenizer)

    def on_train_start(self, trainer, pl_module):
        if 0 in self.steps and trainer.global_step == 0:
            self._score(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps and not any(r["step"] == step + self.step_offset for r in self.records):
            self._score(trainer, pl_module)

    def _score(self, trainer, pl_module) -> None:
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: HeldOutEvaluation was not bound to the run's tokenizer (train() does this)")
        model = pl_module.model
        modes = _training_modes(model)
        model.eval()
        try:
            arm = LoadedModel(model, self.tokenizer, self.processor, name=self.name, source="(in training)")
            sets = {"": self.items}
            last = self.final_step is not None and trainer.global_step == self.final_step
            if last and self.ablated_items:
                sets["_ablated"] = self.ablated_items
            for suffix, items in sets.items():
                # Scored at the training precision (bf16 autocast under precision=bf16-mixed), as it trains.
                with trainer.precision_plugin.forward_context():
                    result = evaluate_arm(arm, list(items), self._config, name=self.name + suffix)
                if len(result.predictions) != len(items):
                    raise RuntimeError(f"{self.name}: {len(result.unreadable)} held-out items could not be read")
                record = {
                    "arm": self.name + suffix,
                    "step": trainer.global_step + self.step_offset,
                    "by_type": accuracy_by_type(items, result.predictions, seed=self.seed),
                }
                self.records.append(record)
                if last:
                    self.final_predictions[self.name + suffix] = result.predictions
                print(f"held-out {record['arm']} at step {record['step']}: " + ", ".join(
                    f"{t} {100 * v['accuracy']:.1f}%" for t, v in record["by_type"].items()
                ))
        finally:
            _restore_training_modes(model, modes)


def _training_modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _restore_training_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    # Frozen parts stay in eval mode during training (StageModule.on_fit_start): restore module by module.
    for name, module in model.named_modules():
        module.training = modes.get(name, module.training)


__all__ = ["HeldOutEvaluation"]
