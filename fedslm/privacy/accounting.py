"""Privacy accounting: epsilon from (q, sigma, steps) segments, and noise calibration.

Pure functions of numbers. A site's spend is a list of segments, one per run of DP-SGD steps
with the same sampling rate and noise multiplier, composed. Three accountants:

- ``prv``: Opacus' PRV accountant, the default and the number fedslm reports;
- ``pld``: dp-accounting's privacy-loss-distribution accountant, the independent recomputation;
- ``rdp``: dp-accounting's Renyi accountant, looser, kept as the conservative reference.

Every epsilon leaves this module together with the name of the accountant that produced it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Accountant = Literal["prv", "rdp", "pld"]
ACCOUNTANTS: tuple[Accountant, ...] = ("prv", "rdp", "pld")

ACCOUNTANT_NAMES: dict[str, str] = {
    "prv": "opacus.accountants.PRVAccountant (privacy random variables)",
    "pld": "dp_accounting.pld.PLDAccountant (privacy loss distributions)",
    "rdp": "dp_accounting.rdp.RdpAccountant (Renyi DP)",
}


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


def epsilon(segments: Sequence[Segment], delta: float, accountant: Accountant = "prv") -> float:
    """Epsilon of the composition of ``segments`` at ``delta`` under ``accountant``.

    Returns 0 for no steps and ``inf`` if any step ran without noise.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    segs = merge(segments)
    if not segs:
        return 0.0
    if any(s.sigma == 0.0 for s in segs):
        return math.inf
    if accountant == "prv":
        return _prv_epsilon(segs, delta)
    if accountant == "pld":
        return _pld_epsilon(segs, delta)
    if accountant == "rdp":
        return _rdp_epsilon(segs, delta)
    raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")


def calibrate_noise(
    target_epsilon: float, delta: float, q: float, steps: int, accountant: Accountant = "prv"
) -> float:
    """Smallest noise multiplier whose ``steps`` steps at rate ``q`` stay within the target.

    Bisection on ``epsilon`` itself, so the result is consistent with what the site later
    reports under the same accountant, whichever accountant that is.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def eps(sigma: float) -> float:
        return epsilon([Segment(q, sigma, steps)], delta, accountant)

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
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(s.sigma, s.q, s.steps) for s in segs]
    with warnings.catch_warnings():
        # PRV warns when its discretisation is coarse for tiny epsilons; the value stays an
        # upper bound, which is what we report.
        warnings.simplefilter("ignore")
        # Opacus' default error (0.01) is absolute: 3% of an epsilon of 0.3. Tighten it to
        # 0.3% of the estimate so PRV and PLD agree within 1% at every scale; a finer grid
        # costs seconds only for small epsilons.
        rough = float(acc.get_epsilon(delta=delta))
        error = min(0.01, max(1e-4, 0.003 * rough))
        if error >= 0.01:
            return rough
        return float(acc.get_epsilon(delta=delta, eps_error=error))


def _pld_epsilon(segs: Sequence[Segment], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
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
