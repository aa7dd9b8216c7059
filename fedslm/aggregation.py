"""Aggregation of adapter updates: pure functions of tensors, streamed over sites.

``fedavg`` is the example-weighted mean of every adapter tensor, factor by factor
(``fedavg-factors``). For LoRA that averages A and B separately, which is not the mean of the
products B·A; it is the common baseline and is labelled as such. Two rules are exact for LoRA
(the factor algebra they use is in ``fedslm.lora_math``):

- ``ffa``: A is frozen at a shared initialisation, so ``mean(B_i) @ A == mean(B_i @ A)``.
- ``exact``: the weighted mean of the dense products ``(alpha_i/r_i) B_i A_i`` per layer,
  refactored to a global rank R by truncated SVD (sites may use different ranks).

Non-LoRA adapter tensors (e.g. the classification head) are the weighted mean in every rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedslm.lora_math import LoraPair, Refactored, factorize, lora_pairs

AdapterState = dict[str, torch.Tensor]


def fedavg(updates: Iterable[tuple[AdapterState, float]]) -> AdapterState:
    """Weighted mean of adapter states, streamed: memory does not grow with the site count.

    Every state must have the same tensor names and shapes as the first; weights must be > 0.
    Accumulates in float64 so the result does not depend on site order beyond float32 rounding.
    """
    total: dict[str, torch.Tensor] = {}
    weight_sum = 0.0
    for state, weight in updates:
        if not weight > 0:
            raise ValueError(f"aggregation weight must be > 0, got {weight}")
        if not total:
            total = {k: v.to(torch.float64) * weight for k, v in state.items()}
        else:
            if state.keys() != total.keys():
                diff = sorted(set(state) ^ set(total))[:3]
                raise ValueError(f"updates disagree on tensor names: {diff}")
            for k, v in state.items():
                if v.shape != total[k].shape:
                    raise ValueError(f"{k}: shape {tuple(v.shape)} != {tuple(total[k].shape)}")
                total[k].add_(v.to(torch.float64), alpha=weight)
        weight_sum += weight
    if not total:
        raise ValueError("nothing to aggregate")
    return {k: (v / weight_sum).to(torch.float32) for k, v in total.items()}


def ffa(updates: Iterable[tuple[AdapterState, float]]) -> AdapterState:
    """Aggregation for LoRA with A frozen at a shared initialisation (FFA-LoRA), streamed.

    B factors and non-LoRA tensors are the weighted mean; every A must be bitwise identical to
    the first update's (else ValueError naming the tensor) and is passed through unchanged.
    Exact when the sites share rank and alpha (the shared A fixes the rank; alpha is not seen).
    """
    first: AdapterState | None = None
    frozen: set[str] = set()
    total: dict[str, torch.Tensor] = {}
    weight_sum = 0.0
    for state, weight in updates:
        _check_weight(weight)
        if first is None:
            first = state
            frozen = {p.a_key for p in lora_pairs(state).values()}
            total = {
                k: torch.zeros(v.shape, dtype=torch.float64)
                for k, v in state.items()
                if k not in frozen
            }
        _check_same_tensors(first, state)
        for key, value in state.items():
            if key in frozen:
                if not torch.equal(value, first[key]):
                    raise ValueError(f"{key}: A differs between updates; ffa needs a frozen A")
            else:
                total[key].add_(value.to(torch.float64), alpha=weight)
        weight_sum += weight
    if first is None:
        raise ValueError("nothing to aggregate")
    return {
        k: first[k].clone() if k in frozen else (total[k] / weight_sum).to(torch.float32)
        for k in first
    }


def exact(
    updates: Iterable[tuple[AdapterState, float, float]],
    rank: int,
    alpha: float,
    *,
    keep_trainable: bool = True,
) -> Refactored:
    """Weighted mean of the dense LoRA updates, refactored to global ``rank`` by truncated SVD.

    ``updates`` yields ``(state, weight, site_alpha)``; a site's rank is read per layer from its
    factor shapes, so sites may differ. Per layer ``M = Σ w_i (alpha_i/r_i) B_i A_i / Σ w_i`` is
    accumulated in float64 (one dense matrix per layer, whatever the site count); the result
    has ``(alpha/rank) · B @ A`` equal to the best rank-``rank`` approximation of M, exactly M
    when ``rank`` >= the sum of the site ranks. See ``factorize`` for ``keep_trainable``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    order: list[str] | None = None  # the first update's tensor names, in its order
    pairs: dict[str, LoraPair] = {}
    dense: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    weight_sum = 0.0
    for state, weight, site_alpha in updates:
        _check_weight(weight)
        if not site_alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {site_alpha}")
        site_pairs = lora_pairs(state)
        if order is None:
            order, pairs = list(state), site_pairs
            dense = {
                n: torch.zeros(p.out_features, p.in_features, dtype=torch.float64)
                for n, p in pairs.items()
            }
            other = {
                k: torch.zeros(v.shape, dtype=torch.float64)
                for k, v in _non_factors(state, pairs).items()
            }
        _check_same_layers(pairs, site_pairs)
        _check_same_tensors(other, _non_factors(state, site_pairs))
        for name, p in site_pairs.items():
            b, a = state[p.b_key].to(torch.float64), state[p.a_key].to(torch.float64)
            dense[name].addmm_(b, a, alpha=weight * site_alpha / p.rank)
        for key in other:
            other[key].add_(state[key].to(torch.float64), alpha=weight)
        weight_sum += weight
    if order is None:
        raise ValueError("nothing to aggregate")
    out: AdapterState = {}
    lost: dict[str, float] = {}
    for name, p in pairs.items():
        dense[name] /= weight_sum
        b, a, lost[name] = factorize(dense.pop(name), rank, alpha, keep_trainable=keep_trainable)
        out[p.a_key], out[p.b_key] = a, b
    for key, total in other.items():
        out[key] = (total / weight_sum).to(torch.float32)
    return Refactored({k: out[k] for k in order}, lost)


def weighted_mean(values: Iterable[tuple[float, float]]) -> float | None:
    """Mean of ``(value, weight)`` pairs, ignoring NaN values; None if nothing is left."""
    num = den = 0.0
    for value, weight in values:
        if value == value:  # not NaN
            num += value * weight
            den += weight
    return num / den if den else None


def _check_weight(weight: float) -> None:
    if not weight > 0:
        raise ValueError(f"aggregation weight must be > 0, got {weight}")


def _non_factors(state: AdapterState, pairs: dict[str, LoraPair]) -> AdapterState:
    factors = {k for p in pairs.values() for k in (p.a_key, p.b_key)}
    return {k: v for k, v in state.items() if k not in factors}


def _check_same_tensors(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> None:
    if state.keys() != expected.keys():
        diff = sorted(set(expected) ^ set(state))[:3]
        raise ValueError(f"updates disagree on tensor names: {diff}")
    for key, ref in expected.items():
        value = state[key]
        if value.shape != ref.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(ref.shape)}")


def _check_same_layers(expected: dict[str, LoraPair], got: dict[str, LoraPair]) -> None:
    if expected.keys() != got.keys():
        diff = sorted(set(expected) ^ set(got))[:3]
        raise ValueError(f"updates disagree on LoRA layers: {diff}")
    for name, p in got.items():
        ref = expected[name]
        if (p.out_features, p.in_features) != (ref.out_features, ref.in_features):
            raise ValueError(
                f"{name}: LoRA layer is {p.out_features}x{p.in_features}, "
                f"expected {ref.out_features}x{ref.in_features}"
            )
