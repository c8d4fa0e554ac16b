"""Shared pieces of the stage modules: optimizer + schedule, the non-finite guard, trainable-only checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule of one stage.

    Fields:
        lr: peak learning rate. weight_decay: AdamW decoupled weight decay (not applied to biases and norms).
        warmup_steps: linear warm-up steps, then cosine decay to 0 at `total_steps` (a run shorter than its
            warm-up simply ends while still warming up).
        betas: AdamW betas. max_nonfinite_in_a_row: stop after this many consecutive skipped steps.
        projector_lr: the projector's own peak learning rate (None: `lr`), same schedule.
        summary_lr: the summary token's projection's own peak learning rate (None: as the rest of the
            projector), same schedule.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    total_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.999)
    max_nonfinite_in_a_row: int = 5
    projector_lr: float | None = None
    summary_lr: float | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ValueError(f"projector_lr must be > 0 or null, got {self.projector_lr}")
        if self.summary_lr is not None and self.summary_lr <= 0:
            raise ValueError(f"summary_lr must be > 0 or null, got {self.summary_lr}")
        if self.total_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_nonfinite_in_a_row < 1:
            raise ValueError(f"max_nonfinite_in_a_row must be >= 1, got {self.max_nonfinite_in_a_row}")


def configure_adamw(parameters, config: OptimConfig, projector_parameters=(), summary_parameters=()):
    """AdamW over the trainable parameters + warm-up/cosine schedule, stepped every optimizer step.

    `projector_parameters` (a subset of `parameters`) train at `config.projector_lr` when it is set, and
    `summary_parameters` (a subset of those) at `config.summary_lr` when that is set.
    """
    summary_ids = {id(p) for p in summary_parameters} if config.summary_lr is not None else set()
    projector_ids = {id(p) for p in projector_parameters} if config.projector_lr is not None else set()
    groups_by_lr: dict[str, tuple[float | None, list, list]] = {
        "base": (None, [], []),
        "projector": (config.projector_lr, [], []),
        "summary": (config.summary_lr, [], []),
    }
    for parameter in parameters:
        if not parameter.requires_grad:
            continue
        key = "summary" if id(parameter) in summary_ids else "projector" if id(parameter) in projector_ids else "base"
        groups_by_lr[key][2 if parameter.ndim < 2 else 1].append(parameter)
    if not any(decay or no_decay for _, decay, no_decay in groups_by_lr.values()):
        raise ValueError("nothing to train: every parameter is frozen")
    # No weight decay on biases and norms. No empty group: torch.distributed.checkpoint's optimizer loader
    # (FSDP resume) matches groups by their parameters' names and leaves an empty group without lr or betas.
    groups = []
    for lr, decay, no_decay in groups_by_lr.values():
        lr_setting = {} if lr is None else {"lr": lr}
        groups += [
            {"params": params, "weight_decay": weight_decay, **lr_setting}
            for params, weight_decay in ((decay, config.weight_decay), (no_decay, 0.0))
            if params
        ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=config.betas,
    )
    from .console import quiet_bitsandbytes_import

    with quiet_bitsandbytes_import():  # transformers.optimization imports peft, which imports bitsandbytes
        from transformers import get_cosine_schedule_with_warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class NonFiniteGuard:
    """Counts non-finite losses and gradients; the step is skipped, and too many in a row stop the run."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0

    def check_loss(self, loss: torch.Tensor) -> bool:
        """True if the loss is finite; otherwise counts a skipped step (the caller returns None)."""
        if torch.isfinite(loss).all():
            return True
        self._skip("loss")
        return False

    def check_gradients(self, module: nn.Module) -> None:
        """Drop all gradients when any is non-finite: optimizers leave parameters without .grad untouched."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads and not _all_finite(grads):
            for parameter in module.parameters():
                parameter.grad = None
            self._skip("gradient")
        elif grads:
            self.in_a_row = 0

    def _skip(self, what: str) -> None:
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row had a non-finite {what}; stopping. Lower the learning rate, "
                "check the data, or use bf16-mixed instead of 16-mixed."
            )


def trainable_state_dict(module: nn.Module, state_dict: dict) -> dict:
    """Only the trainable parameters of `state_dict`: frozen weights are rebuilt from the model, not checkpointed."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable}


def check_trainable_keys_present(module: nn.Module, state_dict: dict) -> None:
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state_dict))
    if missing:
        raise KeyError(
            f"the checkpoint lacks {len(missing)} trainable tensors of this run (e.g. {missing[:3]}); "
            "it was written by a run with another model or stage"
        )


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite, on every rank. Sharded (FSDP2) gradients are DTensors and each rank
    holds a slice: the ranks agree through an all-reduce, or one would skip a step the others take."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    finite = torch.tensor(all(bool(torch.isfinite(g).all()) for g in local), dtype=torch.int32)
    if sharded and torch.distributed.is_initialized():
        finite = finite.to(local[0].device)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)
