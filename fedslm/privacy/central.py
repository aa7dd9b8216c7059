"""Site-level (central) DP at the coordinator: clip each site's update, noise the sum.

Pure functions of tensors. The record-level DP-SGD at each site protects one record; this
protects one *site* in the adapter the coordinator releases (every round's global adapter and
the final one): whatever one site's data, the released adapter is almost as likely without it.

Mechanism, per aggregated round (the Gaussian sum query of DP-FedAvg, McMahan et al. 2018):

- each site's update ``delta_i = state_i - global`` (all adapter tensors, one flat vector) is
  clipped to L2 norm ``C`` and multiplied by its weight ``w_i`` in (0, 1];
- the coordinator adds Gaussian noise of standard deviation ``sigma * C`` to the sum, which has
  L2 sensitivity ``C`` when one site's contribution is removed (zeroed);
- it divides by a *fixed* denominator, the number of sites on the job's roster, so the divisor
  reveals nothing about who replied; a site that drops out just contributes zero.

Every site is asked every round (no sampling), so there is no amplification: ``T`` released
rounds are ``T`` Gaussian mechanisms of noise multiplier ``sigma`` composed, which
``fedslm.privacy.accounting`` accounts as segment ``(q=1, sigma, T)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from fedslm.robust import clip_update

AdapterState = dict[str, torch.Tensor]
Weighting = Literal["uniform", "records"]

WEIGHTING_TEXT: dict[str, str] = {
    "uniform": "uniform: every site's clipped update counts once (w = 1)",
    "records": "capped records: w = min(records, records_cap) / records_cap, at most 1",
}


def site_weight(weighting: Weighting, records: int, records_cap: int | None = None) -> float:
    """A site's weight in (0, 1]. Capping at 1 is what keeps the sensitivity at ``C``."""
    if weighting == "uniform":
        return 1.0
    if records_cap is None or records_cap < 1:
        raise ValueError("records weighting needs records_cap >= 1")
    if records < 1:
        raise ValueError(f"a site with {records} records cannot be weighted")
    return min(records, records_cap) / records_cap


def _f64(state: AdapterState) -> AdapterState:
    return {k: v.to(torch.float64) for k, v in state.items()}


@dataclass(frozen=True)
class NoisedRound:
    """The new global state and what the mechanism did this round."""

    state: AdapterState
    sites: int
    clipped: int
    noise_std: float  # of the sum; the mean's is noise_std / denominator


def noised_mean_update(
    global_state: AdapterState,
    updates: Iterable[tuple[AdapterState, float]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    generator: torch.Generator,
) -> NoisedRound:
    """``global + (sum_i w_i clip(state_i - global) + N(0, (sigma C)^2 I)) / denominator``.

    ``updates`` are ``(site_state, weight)`` pairs with weights in (0, 1]; they are streamed,
    so memory does not grow with the number of sites. ``denominator`` must not depend on which
    sites replied (use the roster size). Noise is drawn from ``generator`` in float64.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"central noise multiplier must be > 0, got {noise_multiplier}")
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    sites = clipped = 0
    for state, weight in updates:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"site weight must be in (0, 1], got {weight}")
        if state.keys() != global_state.keys():
            diff = sorted(set(state) ^ set(global_state))[:3]
            raise ValueError(f"update disagrees with the global adapter on tensor names: {diff}")
        delta = {k: v - global_state[k].to(torch.float64) for k, v in _f64(state).items()}
        bounded, norm = clip_update(delta, clip_norm)
        clipped += norm > clip_norm
        sites += 1
        for k, v in bounded.items():
            total[k].add_(v, alpha=weight)
    std = noise_multiplier * clip_norm
    new: AdapterState = {}
    for k, v in total.items():
        noise = torch.normal(0.0, std, size=v.shape, dtype=torch.float64, generator=generator)
        mean = (v + noise) / denominator
        new[k] = (global_state[k].to(torch.float64) + mean).to(global_state[k].dtype)
    return NoisedRound(new, sites, clipped, std)
