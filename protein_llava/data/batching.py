"""Which examples share a batch: shuffled, length-grouped, or packed several to a row; resumable; rank-sharded.

`ResumableBatchSampler` yields lists of dataset indices, or, with mode="packed", lists of rows (each row the
indices of the examples that share it). Packing is decided here and only here: the collator lays out the rows
it is given. The sampler is a pure function of (seed, epoch, rank), so `resume_from(epoch, batches_done)` lets
a resumed run see exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils.data import Sampler

Batching = Literal["random", "length_grouped", "packed"]
BATCHING_MODES = ("random", "length_grouped", "packed")


def first_fit_packs(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: longest examples first, each into the first pack with room (<= capacity tokens)."""
    packs: list[list[int]] = []
    room: list[int] = []
    for index in sorted(indices, key=lambda i: -lengths[i]):
        if lengths[index] > capacity:
            raise ValueError(f"example {index} has {lengths[index]} tokens, more than pack_length={capacity}")
        for slot, free in enumerate(room):
            if lengths[index] <= free:
                packs[slot].append(index)
                room[slot] -= lengths[index]
                break
        else:
            packs.append([index])
            room.append(capacity - lengths[index])
    return packs


Batch = list[int] | list[list[int]]  # indices, or packed rows of indices


class ResumableBatchSampler(Sampler[Batch]):
    """Batches of indices for one rank (packed: batches of rows of indices).

    Args:
        lengths: token count of every example (used by "length_grouped" and "packed").
        batch_size: examples per batch ("random", "length_grouped") or packed rows per batch ("packed").
        mode: "random" (a seeded permutation cut into batches), "length_grouped" (similar lengths together,
            within windows of `group_window` batches, batch order shuffled) or "packed" (first-fit
            decreasing rows of at most `pack_length` tokens, within windows of `group_window` batches; each
            batch is a list of `batch_size` rows, each row a list of indices).
        seed / shuffle: the data order. rank / world_size: each rank gets every world_size-th batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mode: Batching = "random",
        shuffle: bool = True,
        pack_length: int | None = None,
        group_window: int = 64,
        rank: int = 0,
        world_size: int = 1,
    ):
        if mode not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mode == "packed" and (pack_length is None or pack_length < 1):
            raise ValueError("batching=packed needs pack_length >= 1 (tokens per packed row)")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.mode, self.shuffle = batch_size, seed, mode, shuffle
        self.pack_length, self.group_window = pack_length, group_window
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches already consumed on this rank)
        self._cached: tuple[int, list[Batch]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, batches_done: int) -> None:
        self._skip = (epoch, batches_done)

    def _generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 2 + offset)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.lengths)))
        return torch.randperm(len(self.lengths), generator=self._generator()).tolist()

    def all_batches(self) -> list[Batch]:
        """Every batch of this epoch, for all ranks, before sharding (computed once per epoch)."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._compute_batches())
        return self._cached[1]

    def _compute_batches(self) -> list[Batch]:
        order = self._order()
        if self.mode == "random":
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            batches = [b for b in batches if len(b) == self.batch_size]
        else:
            window = self.batch_size * self.group_window
            if self.mode == "packed":
                # A window holds about group_window batches of packed rows: rows take several examples each.
                typical = sorted(self.lengths)[len(self.lengths) // 2] if self.lengths else 1
                window *= max(1, self.pack_length // max(typical, 1))
            batches = []
            for start in range(0, len(order), window):
                chunk = order[start : start + window]
                if self.mode == "length_grouped":
                    chunk = sorted(chunk, key=lambda i: -self.lengths[i])
                    groups = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
                    batches += [g for g in groups if len(g) == self.batch_size]
                else:
                    packs = first_fit_packs(chunk, self.lengths, self.pack_length)
                    for i in range(0, len(packs) - self.batch_size + 1, self.batch_size):
                        batches.append(packs[i : i + self.batch_size])
            if self.shuffle:
                permutation = torch.randperm(len(batches), generator=self._generator(offset=1)).tolist()
                batches = [batches[i] for i in permutation]
        usable = len(batches) - len(batches) % self.world_size  # every rank takes the same number of steps
        return batches[:usable]

    def __iter__(self):
        batches = self.all_batches()[self.rank :: self.world_size]
        if self._skip is not None and self._skip[0] == self.epoch:
            batches = batches[self._skip[1] :]
            self._skip = None
        return iter(batches)

    def __len__(self) -> int:
        return len(self.all_batches()) // self.world_size
