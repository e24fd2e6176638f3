"""The multiple-proposal move of ``power_mcmc`` (:mod:`powerserve.decoders.multi_proposal`),
checked exactly on small weight vectors.

The move probabilities of :func:`choose` are integrated over its two uniforms on a midpoint
grid of G x G points (G = 100): the grid error of a probability is below 2/G = 0.02 for the
proposal CDF and the acceptance threshold together, so the checks use a tolerance of 0.03.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from powerserve.decoders.multi_proposal import choose, log_acceptance, log_weight, value_probabilities

G = 100
GRID = (np.arange(G) + 0.5) / G


def move_probabilities(log_weights: list[float], keys: Sequence[object]) -> dict[object, float]:
    """P(next state's key = k) from point 0, integrated over the grid of both uniforms."""
    out: dict[object, float] = {}
    for u in GRID:
        for v in GRID:
            k = keys[choose(log_weights, keys, float(u), float(v))]
            out[k] = out.get(k, 0.0) + 1.0 / (G * G)
    return out


def test_log_weight_by_hand() -> None:
    assert log_weight(4.0, [-1.0, -2.0], [-0.5, -1.0], 3) == pytest.approx(4 * -3.0 + 1.5 - math.log(3))


def test_values_group_equal_suffixes() -> None:
    firsts, pi = value_probabilities([0.0, math.log(2), 0.0, math.log(2)], ["a", "b", "a", "c"])
    assert firsts == [0, 1, 3]
    assert pi.tolist() == pytest.approx([2 / 6, 2 / 6, 2 / 6])


def test_one_candidate_is_the_metropolis_hastings_step() -> None:
    """K = 1: move with probability min(1, w(y)/w(x)), the single-proposal MH acceptance."""
    old, new = ([-1.0, -2.0], [-0.5, -1.0], 5), ([-0.3, -0.1, -4.0], [-0.2, -0.9, -2.0], 6)
    for alpha in (1.0, 2.0, 4.0):
        lw = [log_weight(alpha, *old), log_weight(alpha, *new)]
        expected = min(1.0, math.exp(lw[1] - lw[0]))
        ratio = log_acceptance(alpha, old[0], old[1], new[0], new[1], old[2], new[2])
        assert ratio == pytest.approx(lw[1] - lw[0])
        moved = sum(choose(lw, ["x", "y"], 0.5, float(u)) for u in GRID) / G
        assert moved == pytest.approx(expected, abs=1.0 / G)


def test_identical_candidates_never_move() -> None:
    assert choose([0.0, 5.0, 5.0], ["x", "x", "x"], 0.3, 0.0) == 0


@pytest.mark.parametrize("seed", range(2))
def test_the_move_is_reversible_for_the_value_weights(seed: int) -> None:
    """pi_c T(c, v) = pi_v T(v, c) for every pair of values, with duplicates among the points;
    and T(c, v) >= pi_v (Peskun: at least the plain i-SIR draw's chance of reaching v)."""
    rng = np.random.default_rng(seed)
    keys = ["a", "b", "c", "d", "b", "a"]
    lw_of = {k: float(rng.normal() * 2) for k in "abcd"}
    pi = {k: keys.count(k) * math.exp(lw_of[k]) for k in "abcd"}
    total = sum(pi.values())
    pi = {k: v / total for k, v in pi.items()}
    moves = {}
    for c in "abcd":
        order = [c, *(k for k in keys if k != c), *([c] * (keys.count(c) - 1))]
        moves[c] = move_probabilities([lw_of[k] for k in order], order)
    for c in "abcd":
        assert sum(moves[c].values()) == pytest.approx(1.0)
        for v in "abcd":
            if v == c:
                continue
            assert pi[c] * moves[c].get(v, 0.0) == pytest.approx(pi[v] * moves[v].get(c, 0.0), abs=0.03)
            assert moves[c].get(v, 0.0) >= pi[v] - 0.03
