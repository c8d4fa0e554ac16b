"""Accuracy intervals and the paired test between two arms, with no dependency beyond numpy and math."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def accuracy(correct: Sequence[bool]) -> float | None:
    """Fraction correct; None for no items."""
    return sum(map(bool, correct)) / len(correct) if len(correct) else None


def bootstrap_ci(
    correct: Sequence[bool], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the accuracy; None for no items. Same seed → same interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    outcomes = np.asarray(correct, dtype=np.float64)
    if outcomes.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = outcomes[rng.integers(0, outcomes.size, size=(samples, outcomes.size))].mean(axis=1)  # (samples,)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class McNemarResult:
    """Discordant pairs (`only_first`: first arm right and second wrong; `only_second`: the reverse) and
    the exact two-sided p-value."""

    only_first: int
    only_second: int
    p_value: float


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> McNemarResult:
    """Exact McNemar test on paired outcomes: a two-sided binomial test of the discordant pairs at 1/2.

    p = min(1, 2 · Σ_{i ≤ min(b, c)} C(b + c, i) / 2^(b + c)); p = 1 with no discordant pairs.
    """
    if len(first) != len(second):
        raise ValueError(f"paired outcomes differ in length: {len(first)} vs {len(second)}")
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    discordant = only_first + only_second
    if discordant == 0:
        return McNemarResult(0, 0, 1.0)
    tail = sum(math.comb(discordant, i) for i in range(min(only_first, only_second) + 1))
    # Integers until the one division (Python rounds int / int correctly), so large counts stay exact.
    return McNemarResult(only_first, only_second, min(1.0, 2 * tail / 2**discordant))


__all__ = ["McNemarResult", "accuracy", "bootstrap_ci", "mcnemar_exact"]
