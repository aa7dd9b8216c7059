"""The one-run audit's lower bound (fedslm.audit.bound) against scipy's binomial, computed
here independently of the module's log-gamma sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from fedslm.audit.bound import best_bound, lower_bound, p_value


def reference_p(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """The issue's formula with scipy.stats.binom."""
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = float(binom.sf(v - 1, r, q))  # P[B >= v]
    if v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    window = binom.cdf(v - 1, r, q) - binom.cdf(v - i - 1, r, q)  # P[v - i <= B < v]
    return min(1.0, beta + 2 * m * delta * float(np.max(window / i)))


def reference_bound(m: int, r: int, v: int, delta: float, level: float = 0.05) -> float:
    """The largest eps on a 2e-3 grid up to 12 with p(eps) < level, by brute force."""
    best = 0.0
    for k in range(0, 6001):
        eps = k / 500
        if reference_p(eps, m, r, v, delta) < level:
            best = eps
    return best


CASES = [
    (100, 10, 10, 1e-5),
    (200, 20, 19, 1e-5),
    (500, 50, 45, 1e-5),
    (1000, 100, 80, 1e-4),
    (1000, 500, 400, 1e-6),
    (300, 30, 30, 1e-3),
    (60, 60, 50, 1e-2),
]


@pytest.mark.parametrize("m,r,v,delta", CASES)
def test_p_value_matches_scipy(m: int, r: int, v: int, delta: float) -> None:
    for eps in (0.0, 0.3, 1.0, 2.5, 6.0):
        assert p_value(eps, m, r, v, delta) == pytest.approx(
            reference_p(eps, m, r, v, delta), rel=1e-9, abs=1e-14
        )


@pytest.mark.parametrize("m,r,v,delta", CASES)
def test_lower_bound_matches_brute_force(m: int, r: int, v: int, delta: float) -> None:
    bound = lower_bound(m, r, v, delta)
    assert bound == pytest.approx(reference_bound(m, r, v, delta), abs=2.5e-3)
    # it is where p crosses the level: below it rejected, just above not
    assert reference_p(bound - 1e-4, m, r, v, delta) < 0.05 or bound == 0.0
    assert reference_p(bound + 1e-4, m, r, v, delta) >= 0.05


def test_known_values() -> None:
    # 10 of 10 right, delta negligible: q^10 = 0.05 -> q = 0.741, eps = log(q / (1 - q))
    q = 0.05 ** (1 / 10)
    assert lower_bound(10**6, 10, 10, 1e-12) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    # a larger delta weakens the bound
    assert lower_bound(1000, 100, 90, 1e-3) < lower_bound(1000, 100, 90, 1e-6)


def test_edge_cases() -> None:
    assert lower_bound(100, 0, 0, 1e-5) == 0.0  # no guesses
    assert lower_bound(100, 20, 0, 1e-5) == 0.0  # all wrong
    assert p_value(3.0, 100, 20, 0, 1e-5) == 1.0
    assert lower_bound(100, 20, 10, 1e-5) == 0.0  # chance level: nothing rejected
    assert lower_bound(100, 100, 100, 1e-5) > lower_bound(100, 50, 50, 1e-5) > 0  # v = r
    assert lower_bound(100, 1, 1, 0.0) == 0.0  # one right guess proves nothing at 95%
    for bad in ((10, 11, 1), (10, 5, 6), (10, 5, -1)):
        with pytest.raises(ValueError):
            lower_bound(*bad, 1e-5)


def test_scanning_splits_the_level() -> None:
    counts = {10: 10, 20: 19, 50: 40}
    found = best_bound(200, counts, 1e-5)
    for r, (v, eps) in found.per_r.items():
        assert eps == pytest.approx(lower_bound(200, r, v, 1e-5, 0.05 / 3))
    assert found.epsilon == max(eps for _, eps in found.per_r.values())
    assert found.guesses in counts and found.correct == counts[found.guesses]
    # one r alone at the full level is at least as strong as the same r in a scan
    assert lower_bound(200, 20, 19, 1e-5) >= found.per_r[20][1]
