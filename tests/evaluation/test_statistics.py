"""Tests for protein_llava.evaluation.statistics: exact McNemar against hand-computed values, bootstrap."""

from __future__ import annotations

import pytest

from protein_llava.evaluation.statistics import accuracy, bootstrap_ci, mcnemar_exact


def paired(only_first: int, only_second: int, both: int = 3, neither: int = 2) -> tuple[list[bool], list[bool]]:
    first = [True] * only_first + [False] * only_second + [True] * both + [False] * neither
    second = [False] * only_first + [True] * only_second + [True] * both + [False] * neither
    return first, second


@pytest.mark.parametrize(
    ("only_first", "only_second", "p_value"),
    [
        (0, 0, 1.0),  # no discordant pairs
        (1, 0, 1.0),  # 2 · C(1,0) / 2 = 1
        (5, 0, 0.0625),  # 2 · 1 / 32
        (0, 6, 0.03125),  # 2 · 1 / 64
        (8, 2, 0.109375),  # 2 · (1 + 10 + 45) / 1024 = 112 / 1024
        (3, 3, 1.0),  # 2 · (1 + 6 + 15 + 20) / 64 = 84 / 64, capped at 1
        (10, 1, 0.01171875),  # 2 · (1 + 11) / 2048 = 24 / 2048
    ],
)
def test_mcnemar_exact_matches_hand_computed(only_first, only_second, p_value):
    result = mcnemar_exact(*paired(only_first, only_second))
    assert (result.only_first, result.only_second) == (only_first, only_second)
    assert result.p_value == pytest.approx(p_value, rel=1e-12)


def test_mcnemar_is_symmetric_and_exact_for_many_pairs():
    assert mcnemar_exact(*paired(7, 2)).p_value == mcnemar_exact(*paired(2, 7)).p_value
    # 1500 discordant pairs: 2**1500 overflows a float, the integer arithmetic does not.
    assert 0 < mcnemar_exact(*paired(800, 700)).p_value < 0.02


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact([True], [True, False])


def test_bootstrap_is_seeded_and_sensible():
    outcomes = [True] * 30 + [False] * 70
    interval = bootstrap_ci(outcomes, samples=500, seed=7)
    assert interval == bootstrap_ci(outcomes, samples=500, seed=7)
    assert interval != bootstrap_ci(outcomes, samples=500, seed=8)
    assert interval[0] < 0.3 < interval[1] and 0.15 < interval[0] and interval[1] < 0.45
    assert bootstrap_ci([True] * 5) == (1.0, 1.0)
    assert bootstrap_ci([]) is None


def test_accuracy():
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy([]) is None
