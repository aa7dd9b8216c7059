"""The empirical lower bound on epsilon from one training run (Steinke, Nasr, Jagielski 2023,
"Privacy Auditing with One (1) Training Run", Theorem 5.2 / Algorithm 2 with abstentions).

Pure math, no torch: ``m`` canaries, each included independently with probability 1/2; the
auditor guesses "member" or "non-member" for ``r`` of them and abstains on the rest; ``v`` of
the ``r`` guesses are right. If the training run is (eps, delta)-DP, then with
``q = e^eps / (1 + e^eps)``

    beta  = P[Binomial(r, q) >= v]
    alpha = max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i
    p(eps) = min(1, beta + 2 m delta alpha)

is a p-value for the hypothesis "the run is eps-DP": seeing ``v`` or more right guesses has
probability at most p(eps). An eps with p(eps) < level is rejected, and so is every smaller
eps (eps'-DP implies eps-DP for eps >= eps'). The lower bound is the largest eps rejected.

Monotonicity. ``beta`` is nondecreasing in eps (a binomial tail grows with its success
probability q, and q grows with eps). The delta term need not be: P[v - i <= B < v] can fall
as q grows (e.g. P[B = r - 1] near q = 1). So the bound here is the *first* eps at which p
reaches the level, found on a grid of ``GRID_STEP`` and refined by bisection inside the first
grid cell where p reaches it. That is valid with or without monotonicity: if the run is
eps*-DP and the bound L exceeds eps*, then p(eps*) < level, which has probability at most
``level``. When p is nondecreasing (always when ``2 m delta`` is small against ``beta``, as for
any delta below 1/N) it is exactly the largest eps with p(eps) < level.

Several r: each count is tested at ``level / k`` for k values of r (Bonferroni), and the best
bound is reported; the overall confidence stays ``1 - level``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.05  # 95% confidence
EPS_MAX = 30.0  # q = 1 - 1e-13: beyond any audit with fewer than ~1e12 canaries
GRID_STEP = 0.05
TOLERANCE = 1e-6


def _log_q(eps: float) -> tuple[float, float]:
    """(log q, log(1 - q)) for q = e^eps / (1 + e^eps), accurate for large eps."""
    log1p = math.log1p(math.exp(-eps))
    return -log1p, -eps - log1p


def binomial_pmf(r: int, eps: float) -> list[float]:
    """P[Binomial(r, q) = k] for k = 0..r, q = e^eps / (1 + e^eps), from log-gamma sums."""
    lq, lnq = _log_q(eps)
    base = math.lgamma(r + 1)
    return [
        math.exp(base - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * lq + (r - k) * lnq)
        for k in range(r + 1)
    ]


def p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """p(eps) = min(1, beta + 2 m delta alpha) for ``v`` right out of ``r`` guesses among
    ``m`` canaries (see the module docstring)."""
    _check_counts(m, r, v)
    if v == 0:
        return 1.0  # P[B >= 0] = 1: zero right guesses reject nothing
    pmf = binomial_pmf(r, eps)
    beta = min(1.0, sum(pmf[v:]))
    # alpha: the window [v - i, v) grows by one term per i, summed from the top down
    alpha, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += pmf[v - i]
        alpha = max(alpha, window / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def lower_bound(
    m: int, r: int, v: int, delta: float, level: float = LEVEL, eps_max: float = EPS_MAX
) -> float:
    """The empirical lower bound on epsilon at confidence ``1 - level``: the first eps >= 0
    where ``p_value`` reaches ``level`` (0 when p(0) already does; ``eps_max`` when it never
    does below that)."""
    _check_counts(m, r, v)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")

    def rejected(eps: float) -> bool:
        return p_value(eps, m, r, v, delta) < level

    if v == 0 or not rejected(0.0):
        return 0.0
    lo = 0.0
    steps = math.ceil(eps_max / GRID_STEP)
    for k in range(1, steps + 1):
        hi = min(eps_max, k * GRID_STEP)
        if not rejected(hi):
            break
        lo = hi
    else:
        return eps_max
    while hi - lo > TOLERANCE:
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Bound:
    """The best bound over several numbers of guesses, each tested at ``level / len(counts)``."""

    epsilon: float
    guesses: int  # the r that gave it
    correct: int  # its v
    level: float  # overall: the confidence is 1 - level
    per_r: dict[int, tuple[int, float]]  # r -> (v, bound at level / k)


def best_bound(m: int, counts: Mapping[int, int], delta: float, level: float = LEVEL) -> Bound:
    """The largest lower bound over ``counts`` (r -> v), the level split evenly among them
    (Bonferroni). Ties keep the smallest r."""
    if not counts:
        raise ValueError("no numbers of guesses to test")
    each = level / len(counts)
    per_r = {r: (v, lower_bound(m, r, v, delta, each)) for r, v in sorted(counts.items())}
    r_best = max(per_r, key=lambda r: (per_r[r][1], -r))
    v_best, eps = per_r[r_best]
    return Bound(eps, r_best, v_best, level, per_r)


def count_correct(
    scores: Sequence[float], included: Sequence[bool], r_values: Sequence[int]
) -> dict[int, int]:
    """For each r: how many of the r highest-scoring canaries are members (the guesses; the
    rest abstain). Ties keep canary order (the order is random: canaries are drawn so)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {r: sum(1 for i in order[:r] if included[i]) for r in r_values}


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
