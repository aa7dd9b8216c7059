"""Aggregation of adapter updates: pure functions of tensors.

``fedavg`` is the example-weighted mean of every adapter tensor, factor by factor
(``fedavg-factors``). For LoRA that averages A and B separately, which is not the mean of the
products B·A; it is the common baseline and is labelled as such.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

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


def weighted_mean(values: Iterable[tuple[float, float]]) -> float | None:
    """Mean of ``(value, weight)`` pairs, ignoring NaN values; None if nothing is left."""
    num = den = 0.0
    for value, weight in values:
        if value == value:  # not NaN
            num += value * weight
            den += weight
    return num / den if den else None
