"""The accounting grid from the issue: PRV (reported) against PLD (independent), RDP above.

Grid: q in {0.001, 0.01, 0.1} x sigma in {0.5, 1, 2} x steps in {10, 1000, 10000} x delta in
{1e-5, 1e-7}, 54 points, each a single segment through ``fedslm.privacy.accounting.epsilon``.

Cost, measured one after the other on this machine (2 cores): PLD 15 s, RDP 2.4 s, PRV about
a minute for 52 points plus about 80 s *each* for the two excluded points (see
``PRV_EXCLUDED``). PRV runs in a pool of worker processes (2 by default;
``FEDSLM_GRID_WORKERS=1`` runs it in this process), longest points first.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from functools import cache

import pytest

from fedslm.privacy.accounting import Segment, epsilon

pytestmark = pytest.mark.integration

Point = tuple[float, float, int, float]

QS = (0.001, 0.01, 0.1)
SIGMAS = (0.5, 1.0, 2.0)
STEPS = (10, 1000, 10000)
DELTAS = (1e-5, 1e-7)
GRID: list[Point] = list(itertools.product(QS, SIGMAS, STEPS, DELTAS))

# fedslm's PRV asks Opacus for an absolute error of max(2e-5, 0.3% of epsilon) and reports the
# upper bound (estimate + error). Below epsilon 0.0067 that 2e-5 floor is more than 0.3%, and
# below 0.002 more than 1% (no grid point is that small: the smallest, q=0.001, sigma=2, 10
# steps, is 0.0045, where PRV reads 0.00455 and PLD 0.00453). So agreement is "within 1%, or
# within PRV's absolute error floor", whichever is larger.
REL_TOL = 0.01
PRV_ABS_ERROR_FLOOR = 2e-5

# Where Opacus' PRV cannot answer. Reason measured by stepping through PRVAccountant: the true
# epsilon (PLD 783 / 830) is above ln(float64 max) = 709.78; PRV evaluates exp(t) on its grid
# of privacy-loss values and divides by a tail sum that underflows (1e-313), the quotient
# overflows and it returns inf, an upper bound that says nothing. Before that it builds a
# 5.8e7-point grid (domain +-893 from an RDP bound at delta/4000, mesh 3.1e-5), 75-85 s.
PRV_EXCLUDED: dict[tuple[float, float, int], str] = {
    (0.1, 0.5, 10000): (
        "Opacus PRV returns inf after ~80 s: epsilon (PLD ~800) exceeds ln(float max) = 709.78, "
        "where PRV's exp(t) overflows; see test_excluded_prv_corner_is_beyond_float_range"
    ),
}


@cache
def pld(point: Point) -> float:
    """PLD epsilon of a grid point (each is needed by two tests)."""
    q, sigma, steps, delta = point
    return epsilon([Segment(q, sigma, steps)], delta, "pld")


def _id(point: Point) -> str:
    q, sigma, steps, delta = point
    return f"q{q:g}-s{sigma:g}-n{steps}-d{delta:g}"


def _prv_params() -> list[object]:
    params: list[object] = []
    for point in GRID:
        reason = PRV_EXCLUDED.get(point[:3])
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(point, id=_id(point), marks=marks))
    return params


def _prv_point(point: Point) -> float:
    q, sigma, steps, delta = point
    return epsilon([Segment(q, sigma, steps)], delta, "prv")


@pytest.fixture(scope="module")
def prv_values() -> dict[Point, Future[float]]:
    """PRV epsilon of every included point, computed in parallel once for the module."""
    points = [p for p in GRID if p[:3] not in PRV_EXCLUDED]
    # longest first: the cost grows with q * steps / sigma (size of PRV's grid)
    points.sort(key=lambda p: p[0] * p[2] / p[1], reverse=True)
    workers = int(os.environ.get("FEDSLM_GRID_WORKERS") or min(2, os.cpu_count() or 1))
    results: dict[Point, Future[float]] = {}
    if workers <= 1:
        for p in points:
            f: Future[float] = Future()
            try:
                f.set_result(_prv_point(p))
            except Exception as exc:  # reported by the test of that point
                f.set_exception(exc)
            results[p] = f
        return results
    # spawn, not fork: the test process may already hold torch's threads
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for q, sigma, steps, delta in points:
            # submit fedslm's own function: workers import it, not this test module
            results[(q, sigma, steps, delta)] = pool.submit(
                epsilon, [Segment(q, sigma, steps)], delta, "prv"
            )
        for f in results.values():
            f.exception()  # wait for all inside the pool's lifetime
    return results


@pytest.mark.parametrize("point", _prv_params())
def test_prv_agrees_with_pld(point: Point, prv_values: dict[Point, Future[float]]) -> None:
    prv, ref = prv_values[point].result(), pld(point)
    assert math.isfinite(prv), f"PRV returned {prv} at {point}"
    tolerance = max(REL_TOL * ref, PRV_ABS_ERROR_FLOOR)
    assert abs(prv - ref) <= tolerance, (
        f"PRV {prv} vs PLD {ref} at {point}: off by {abs(prv - ref) / ref:.2%}"
    )


@pytest.mark.parametrize("point", GRID, ids=_id)
def test_rdp_is_never_below_pld(point: Point) -> None:
    q, sigma, steps, delta = point
    rdp = epsilon([Segment(q, sigma, steps)], delta, "rdp")
    assert rdp >= pld(point)


# the domain bound below runs Opacus' RDP at huge orders, which warns about its alpha range
@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")
def test_excluded_prv_corner_is_beyond_float_range() -> None:
    """Why PRV is skipped at (q 0.1, sigma 0.5, 10000 steps), checked without the 80 s run."""
    import numpy as np
    from opacus.accountants.analysis.prv.domain import compute_safe_domain_size
    from opacus.accountants.analysis.prv.prvs import PoissonSubsampledGaussianPRV

    q, sigma, steps = 0.1, 0.5, 10000
    # the epsilon PRV would have to represent is past where exp() overflows, at both deltas
    for delta in DELTAS:
        assert pld((q, sigma, steps, delta)) > math.log(sys.float_info.max)
    # and the grid Opacus builds for it at fedslm's eps_error (0.01 at this size), delta 1e-5
    eps_error, delta_error = 0.01, 1e-5 / 1000
    half_width = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(q, sigma)], [steps], eps_error, delta_error
    )
    mesh = eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2)
    assert half_width > math.log(sys.float_info.max)
    assert 2 * half_width / mesh > 5e7
