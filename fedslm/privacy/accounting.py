"""Privacy accounting: epsilon from (q, sigma, steps) segments, and noise calibration.

Pure functions of numbers. A site's spend is a list of segments, one per run of DP-SGD steps
with the same sampling rate and noise multiplier, composed. Three accountants:

- ``prv``: Opacus' PRV accountant, the default and the number fedslm reports;
- ``pld``: dp-accounting's privacy-loss-distribution accountant, the independent recomputation;
- ``rdp``: dp-accounting's Renyi accountant, looser, kept as the conservative reference.

Every epsilon leaves this module together with the name of the accountant that produced it.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeGuard

Accountant = Literal["prv", "rdp", "pld"]
ACCOUNTANTS: tuple[Accountant, ...] = ("prv", "rdp", "pld")

ACCOUNTANT_NAMES: dict[str, str] = {
    "prv": "opacus.accountants.PRVAccountant (privacy random variables)",
    "pld": "dp_accounting.pld.PLDAccountant (privacy loss distributions)",
    "rdp": "dp_accounting.rdp.RdpAccountant (Renyi DP)",
}

# How far two computations of one epsilon may differ (relative) and still agree: a reported
# figure against its recomputation by another accountant (the coordinator, the report's
# checks), or a ledger's stored figure against today's library (ledger verify). Both PRV and
# PLD are numerical upper bounds whose grids depend on the estimate and the library version;
# 1% is far below any budget decision (those recompute from segments), and edits are caught by
# the ledger's hash chain and the report's signatures, not by this tolerance.
EPSILON_TOLERANCE = 0.01

# Above this RDP epsilon (an upper bound) PRV and PLD are not run; see ``epsilon``. The largest
# the accounting grid test needs is 2238 (q 0.1, sigma 0.5, 10,000 steps, delta 1e-7).
RDP_CEILING = 5000.0


@dataclass(frozen=True)
class Segment:
    """``steps`` Poisson-sampled Gaussian steps with sampling rate ``q`` and noise ``sigma``."""

    q: float
    sigma: float
    steps: int

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"sampling rate q must be in (0, 1], got {self.q}")
        if self.sigma < 0.0:
            raise ValueError(f"noise multiplier sigma must be >= 0, got {self.sigma}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return asdict(self)


def merge(segments: Sequence[Segment]) -> list[Segment]:
    """Fold segments with the same (q, sigma) together; composition does not care about order."""
    totals: dict[tuple[float, float], int] = {}
    for s in segments:
        totals[(s.q, s.sigma)] = totals.get((s.q, s.sigma), 0) + s.steps
    return [Segment(q, sigma, n) for (q, sigma), n in totals.items() if n > 0]


def is_accountant(name: str) -> TypeGuard[Accountant]:
    """Whether ``name`` is one of ``ACCOUNTANTS``."""
    return name in ACCOUNTANTS


def epsilon(segments: Sequence[Segment], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of ``segments`` at ``delta`` under ``accountant``, one of
    ``ACCOUNTANTS`` (a ValueError otherwise: names read from ledgers and reports reach here).

    Returns 0 for no steps and ``inf`` if any step ran without noise. PRV and PLD also return
    ``inf`` when the RDP bound exceeds ``RDP_CEILING``: their grids grow with the privacy-loss
    range, so a noise multiplier of 1e-3 would ask PLD for 7.6 GiB to compute a number that
    means "no privacy" either way. Results are memoised per (merged segments, delta,
    accountant): a site asks for the same composition in its policy check, its ledger entry
    and its reply, and every accountant here is deterministic.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not is_accountant(accountant):
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    segs = merge(segments)
    if not segs:
        return 0.0
    if any(s.sigma == 0.0 for s in segs):
        return math.inf
    # composition is order-free, so the sorted tuple is a canonical key
    return _epsilon_cached(tuple(sorted(segs, key=lambda s: (s.q, s.sigma))), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(segs: tuple[Segment, ...], delta: float, accountant: Accountant) -> float:
    # Opacus' RDP from per-(q, sigma) cached values: microseconds, where a fresh RDP is 0.1 s
    history = [(s.sigma, s.q, s.steps) for s in segs]
    if accountant != "rdp" and _opacus_rdp_epsilon(history, delta) > RDP_CEILING:
        return math.inf
    if accountant == "prv":
        return _prv_epsilon(segs, delta)
    if accountant == "pld":
        return _pld_epsilon(segs, delta)
    return _rdp_epsilon(segs, delta)


def gaussian_epsilon(noise_multiplier: float, compositions: int, delta: float) -> float:
    """Exact epsilon of ``compositions`` Gaussian mechanisms without sampling (``q = 1``).

    Closed form, independent of every accountant above: T Gaussian mechanisms of noise
    multiplier sigma compose to one with ``mu = sqrt(T) / sigma``, whose privacy profile is
    ``delta(eps) = Phi(mu/2 - eps/mu) - exp(eps) Phi(-mu/2 - eps/mu)`` (Balle and Wang 2018,
    Theorem 8; Dong, Roth and Su 2019). Solved for ``eps`` by bisection to 1e-9.
    """
    from scipy.special import log_ndtr

    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if compositions < 0 or noise_multiplier < 0:
        raise ValueError("compositions and noise multiplier must be >= 0")
    if compositions == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    mu = math.sqrt(compositions) / noise_multiplier

    def delta_at(eps: float) -> float:
        # in log space: exp(eps) * Phi(.) overflows long before the difference does
        a = log_ndtr(mu / 2 - eps / mu)
        b = eps + log_ndtr(-mu / 2 - eps / mu)
        return math.exp(a) - math.exp(b) if a > b else 0.0

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_at(hi) > delta:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = (lo + hi) / 2
        if delta_at(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    accountant: Accountant = "prv",
    prior: Sequence[Segment] = (),
) -> float:
    """Smallest noise multiplier whose ``steps`` steps at rate ``q``, composed after the
    ``prior`` segments (an earlier phase of the same job), stay within the target.

    Bisection on ``epsilon`` itself, so the result is consistent with what the site later
    reports under the same accountant, whichever accountant that is.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def eps(sigma: float) -> float:
        return epsilon([*prior, Segment(q, sigma, steps)], delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(
                f"no noise multiplier reaches epsilon {target_epsilon} with q={q}, "
                f"{steps} steps, delta={delta}"
            )
    # eps is decreasing in sigma; 0.1% relative precision on sigma is far below accountant error
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def _prv_epsilon(segs: Sequence[Segment], delta: float) -> float:
    acc = _prv_accountant()
    acc.history = [(s.sigma, s.q, s.steps) for s in segs]
    with warnings.catch_warnings():
        # PRV warns when its discretisation is coarse for tiny epsilons; the value stays an
        # upper bound, which is what we report.
        warnings.simplefilter("ignore")
        # Opacus' default error (0.01) is absolute: 3% of an epsilon of 0.3. Tighten it to
        # 0.3% of a first estimate so PRV and PLD agree within 1% at every scale; a finer grid
        # costs seconds only for small epsilons. Where the RDP bound (cached, microseconds)
        # is large the default is fine already and the first estimate is skipped: RDP is at
        # most ~1.5x PRV there, so PRV is above 3.3 and 0.01 is within 0.3% of it.
        if _opacus_rdp_epsilon(acc.history, delta) >= 5.0:
            return float(acc.get_epsilon(delta=delta))
        estimate, error = float(acc.get_epsilon(delta=delta)), 0.01
        # an estimate at a coarse error can be several times the value when epsilon is tiny,
        # so refine until the error is within 0.3% of the estimate it is applied to
        for _ in range(3):
            wanted = max(2e-5, 0.003 * estimate)
            if error <= 1.5 * wanted:
                break
            error = wanted
            estimate = float(acc.get_epsilon(delta=delta, eps_error=error))
        return estimate


def _pld_epsilon(segs: Sequence[Segment], delta: float) -> float:
    # dp-accounting's default grid (1e-4 in privacy loss) costs ~0.7 s a call. A 1e-3 grid is
    # 10x faster and, being pessimistic, still an upper bound; it is then refined to 5e-4 of
    # the estimate so its discretisation error stays within 0.5% of epsilon at every scale.
    rough = _pld_at(segs, delta, 1e-3)
    interval = min(1e-3, max(1e-5, 5e-4 * rough))
    return rough if interval >= 1e-3 else _pld_at(segs, delta, interval)


def _pld_at(segs: Sequence[Segment], delta: float, interval: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=interval)
    for s in segs:
        event = dp_accounting.PoissonSampledDpEvent(s.q, dp_accounting.GaussianDpEvent(s.sigma))
        acc.compose(event, s.steps)
    return float(acc.get_epsilon(delta))


def _rdp_epsilon(segs: Sequence[Segment], delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    # For small sigma some Renyi orders do not converge; the library drops them (the bound stays
    # valid) and logs a warning per order, which would bury the run's own output.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        for s in segs:
            event = dp_accounting.PoissonSampledDpEvent(s.q, dp_accounting.GaussianDpEvent(s.sigma))
            acc.compose(event, s.steps)
        return float(acc.get_epsilon(delta))
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------------------------
# Opacus' PRV accountant spends ~90% of a call bounding its discretisation domain with an RDP
# computation in pure Python (about 0.35 s per (q, sigma)), and a site asks again every round
# for the same (q, sigma). The subclass below computes exactly the same domain from RDP values
# cached per (q, sigma); tests/privacy/test_accounting.py checks it is bit-identical to stock
# Opacus.


@functools.lru_cache(maxsize=256)
def _opacus_rdp_per_step(q: float, sigma: float) -> Any:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


def _opacus_rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """``opacus.accountants.RDPAccountant().get_epsilon`` over ``(sigma, q, steps)`` history."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    # the same operations as Opacus (per-step vector times steps, summed with sum()), so the
    # floating-point result is identical
    rdp = sum([_opacus_rdp_per_step(q, sigma) * steps for sigma, q, steps in history])
    with warnings.catch_warnings():
        # "optimal order is the smallest alpha": a looser bound at extreme epsilons, still valid
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.cache
def _prv_class() -> type:
    import numpy as np
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    class CachedDomainPRVAccountant(PRVAccountant):
        """Opacus' PRV accountant; only the domain bound reuses cached RDP values."""

        def _get_domain(
            self,
            prvs: list[Any],
            num_self_compositions: list[int],
            eps_error: float,
            delta_error: float,
        ) -> Any:
            # opacus.accountants.analysis.prv.domain.compute_safe_domain_size, then
            # PRVAccountant._get_domain (Opacus 1.6.0), with the RDP calls memoised
            total = sum(num_self_compositions)
            history = [
                (p.noise_multiplier, p.sample_rate, n)
                for p, n in zip(prvs, num_self_compositions, strict=True)
            ]
            l_max = _opacus_rdp_epsilon(history, delta_error / 4)
            for p in prvs:
                single = [(p.noise_multiplier, p.sample_rate, 1)]
                l_max = max(l_max, _opacus_rdp_epsilon(single, delta_error / (8 * total)))
            size = max(l_max, eps_error) + 3
            mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-size, size, mesh)

    return CachedDomainPRVAccountant


def _prv_accountant() -> Any:
    return _prv_class()()
