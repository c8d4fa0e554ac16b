"""What a training run prints: one line per event, a progress bar with loss and samples/s, a closing table.

Known-benign notices of the libraries are filtered by message, each where it arises and only while the
call that raises it runs (never a blanket filter): the reason for each is written beside it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from ..constants import IGNORE_INDEX


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def _dropping(logger_name: str, *prefixes: str) -> Iterator[None]:
    logger, dropper = logging.getLogger(logger_name), _DropMessages(*prefixes)
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


@contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """Import peft (which imports bitsandbytes when installed) without bitsandbytes' CPU-kernel notice.

    bitsandbytes' CPU backend logs, at import, that the optional `kernels` package is missing: only its 4-bit
    CPU matmul uses it, so for everything but QLoRA on CPU the notice is noise (a QLoRA run builds its 4-bit
    decoder first, and sees it then).
    """
    with _dropping("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"):
        yield


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's notices the user cannot act on, silenced while a Trainer is built and fits."""
    with warnings.catch_warnings(), _dropping(
        "lightning.pytorch.utilities.rank_zero",
        # Advertisements for Lightning's cloud products (LitLogger, LitModels), printed on every run.
        "💡 Tip:",
        # Said when max_steps ends the fit; the closing table gives the steps (and the line, printed while
        # the bar is open, makes tqdm print the bar a second time).
        "`Trainer.fit` stopped: `max_steps=",
    ):
        # StageModule keeps frozen parts in eval mode on purpose (no dropout in what does not learn).
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        # Lightning's own call into torch's pytree API, deprecated by torch 2.13; nothing to change on our side.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        # Lightning checks the DataLoader for state_dict; our position in the epoch travels in the
        # datamodule's state instead (SFTDataModule.state_dict), and the resume test proves it exact.
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
        yield


def count_samples(batch: dict) -> int:
    """Training samples in a batch: its rows, or for packed rows the supervised segments of each row."""
    if "position_ids" not in batch:
        return int(batch["input_ids"].shape[0])
    positions, labels = batch["position_ids"], batch["labels"]
    segment = (positions == 0).cumsum(dim=1)  # (B, T): which packed sample each token belongs to
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(segment)
    supervised = labels != IGNORE_INDEX  # the tail padding of a row supervises nothing
    return int(torch.unique((rows * (positions.shape[1] + 1) + segment)[supervised]).numel())


class StageProgressBar(TQDMProgressBar):
    """Lightning's bar showing the training loss and samples per second (no logger version number)."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._samples, self._started = 0, None

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._samples, self._started = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._samples += count_samples(batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if "train/loss" in items:
            items["loss"] = items.pop("train/loss")
        if self._started is not None and self._samples:
            items["samples/s"] = f"{self._samples / (time.perf_counter() - self._started):.2f}"
        return items


def render_stage_table(summary) -> str:
    """The closing table of a stage: steps, wall time, final loss, records kept / skipped, the run folder."""
    minutes, seconds = divmod(round(summary.wall_seconds or 0), 60)
    rows = [
        ("steps", f"{summary.steps}" + (f" ({summary.nonfinite_skipped_steps} skipped: non-finite)" if summary.nonfinite_skipped_steps else "")),
        ("wall time", f"{minutes}:{seconds:02d}"),
        ("final loss", "n/a" if summary.final_train_loss is None else f"{summary.final_train_loss:.4f}"),
    ]
    if summary.data is not None:
        rows.append(("records", f"{summary.data.kept} kept of {summary.data.seen}; skipped: {summary.data.skipped_text()}"))
    rows.append(("run folder", f"{summary.out}"))
    if summary.export:
        rows.append(("model", f"{summary.export}"))
    width = max(len(name) for name, _ in rows)
    title = f"stage {summary.stage} finished: {summary.run}"
    lines = [title, "-" * len(title)] + [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join(lines)
