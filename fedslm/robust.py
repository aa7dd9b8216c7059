"""Screening of site updates and robust aggregation: pure functions of adapter states.

``screen_updates`` is what the coordinator runs before aggregating; ``clip_update`` bounds one
update's influence; ``coordinate_median`` and ``trimmed_mean`` are aggregation rules that a few
bad updates cannot drag arbitrarily far (unweighted, per coordinate).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedslm.lora_math import lora_pairs

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Screening:
    """Updates that passed, ``(site, reason)`` for those that did not, and the update-delta norm
    of every update whose names and shapes were right."""

    accepted: list[tuple[str, AdapterState]]
    rejected: list[tuple[str, str]]
    norms: dict[str, float]


def screen_updates(
    reference: AdapterState,
    updates: Iterable[tuple[str, AdapterState]],
    *,
    allow_rank_change: bool = False,
    frozen: Collection[str] = (),
    factor: float = 10.0,
    min_updates: int = 3,
) -> Screening:
    """Check each ``(site, state)`` against ``reference`` (the global state sent to the sites).

    Rejected, with a reason naming the site and the tensor: missing or unexpected tensor names,
    a wrong shape, non-finite values. ``allow_rank_change`` (for ``exact`` aggregation) accepts
    LoRA factors whose rank differs from the reference, as long as A and B agree on it.
    Tensors named in ``frozen`` (the A factors under ``ffa``) must equal the reference bitwise.

    Then the norm rule: the update delta ``state - reference``, flattened over all tensors, has
    an L2 norm; an update is rejected when its norm exceeds ``factor`` × the median norm of the
    *other* well-formed updates. It applies only when there are at least ``min_updates``
    well-formed updates (a median of one or two says nothing) and that median is > 0 (nothing to
    compare a scale to). A factor whose rank differs from the reference is compared zero-padded
    to the larger rank.
    """
    if not factor > 1:
        raise ValueError(f"outlier factor must be > 1, got {factor}")
    accepted: list[tuple[str, AdapterState]] = []
    rejected: list[tuple[str, str]] = []
    norms: dict[str, float] = {}
    largest: dict[str, str] = {}  # the tensor that moved most, to name in a norm rejection
    for site, state in updates:
        problems = _problems(reference, state, allow_rank_change)
        moved = [
            k
            for k in frozen
            if k in state and not problems and not torch.equal(state[k], reference[k])
        ]
        if moved:
            problems.append(f"frozen tensors changed: {moved[:3]}")
        if problems:
            rejected.append((site, f"{site}: {'; '.join(problems)}"))
            continue
        parts = {k: _delta_norm(v, reference[k]) for k, v in state.items()}
        norms[site] = math.sqrt(sum(n * n for n in parts.values()))
        largest[site] = max(parts, key=parts.__getitem__) if parts else ""
        accepted.append((site, state))
    if len(accepted) >= min_updates:
        kept = []
        for site, state in accepted:
            median = statistics.median(n for s, n in norms.items() if s != site)
            if median > 0 and norms[site] > factor * median:
                rejected.append(
                    (
                        site,
                        f"{site}: update norm {norms[site]:.4g} is more than {factor:g} x the "
                        f"median {median:.4g} of the other sites' update norms (largest change: "
                        f"{largest[site]})",
                    )
                )
            else:
                kept.append((site, state))
        accepted = kept
    return Screening(accepted, rejected, norms)


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of an update over all of its tensors, as one flat vector (in float64)."""
    return math.sqrt(sum(float(v.to(torch.float64).pow(2).sum()) for v in delta.values()))


def clip_update(delta: Mapping[str, torch.Tensor], max_norm: float) -> tuple[AdapterState, float]:
    """Scale ``delta`` so its global L2 norm (over all tensors) is at most ``max_norm``.

    Returns the clipped delta (copies; unchanged values when already within the bound) and the
    original norm. A non-finite norm is a ValueError: there is no meaningful way to scale it.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("update has a non-finite norm; screen it out before clipping")
    if norm <= max_norm:
        return {k: v.clone() for k, v in delta.items()}, norm
    scale = max_norm / norm
    return {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in delta.items()}, norm


def coordinate_median(states: Sequence[AdapterState]) -> AdapterState:
    """Per-coordinate median of the states (the mean of the two middle values for an even
    count). Expects finite values (screen first)."""
    return _per_coordinate(states, lambda s, n: (s[(n - 1) // 2] + s[n // 2]) / 2)


def trimmed_mean(states: Sequence[AdapterState], trim_fraction: float) -> AdapterState:
    """Per-coordinate mean after dropping the ``floor(trim_fraction · n)`` largest and as many
    smallest values (as scipy's ``trim_mean``); ValueError if that would drop every value."""
    n = len(states)
    if not 0 <= trim_fraction < 1:
        raise ValueError(f"trim_fraction must be in [0, 1), got {trim_fraction}")
    cut = int(trim_fraction * n)
    if n - 2 * cut < 1:
        raise ValueError(
            f"trim_fraction {trim_fraction} drops {cut} of {n} values from each end: none left"
        )
    return _per_coordinate(states, lambda s, n: s[cut : n - cut].mean(dim=0))


def _per_coordinate(
    states: Sequence[AdapterState], reduce: Callable[[torch.Tensor, int], torch.Tensor]
) -> AdapterState:
    if not states:
        raise ValueError("nothing to aggregate")
    first = states[0]
    for state in states[1:]:
        problems = _problems(first, state, allow_rank_change=False, check_finite=False)
        if problems:
            raise ValueError(f"states disagree: {problems[0]}")
    out: AdapterState = {}
    for key, ref in first.items():
        # one tensor at a time: the stack is n copies of one tensor, not of the whole state
        stacked = torch.stack([s[key].to(torch.float64) for s in states])
        out[key] = reduce(stacked.sort(dim=0).values, len(states)).to(ref.dtype)
    return out


def _problems(
    reference: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    allow_rank_change: bool,
    check_finite: bool = True,
) -> list[str]:
    """What is wrong with ``state`` as an update of ``reference``, one string per problem."""
    problems = []
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing:
        problems.append(f"missing tensors {missing[:5]}")
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}")
    rank_free: dict[str, int] = {}  # factor name -> its dimension that may differ (the rank)
    if allow_rank_change:
        try:
            for p in lora_pairs(state).values():
                rank_free[p.a_key], rank_free[p.b_key] = 0, 1
        except ValueError as exc:
            problems.append(str(exc))
    for key in sorted(set(reference) & set(state)):
        got, want = tuple(state[key].shape), tuple(reference[key].shape)
        free = rank_free.get(key)
        same = got == want or (
            free is not None
            and len(got) == len(want)
            and all(g == w for i, (g, w) in enumerate(zip(got, want, strict=True)) if i != free)
        )
        if not same:
            problems.append(f"tensor {key}: shape {got}, expected {want}")
        elif check_finite:
            bad = int((~torch.isfinite(state[key])).sum())
            if bad:
                problems.append(f"tensor {key}: {bad} non-finite values")
    return problems


def _delta_norm(value: torch.Tensor, ref: torch.Tensor) -> float:
    """L2 norm of ``value - ref``, zero-padding both to the larger shape (a changed rank)."""
    v, r = value.to(torch.float64), ref.to(torch.float64)
    if v.shape != r.shape:
        shape = [max(a, b) for a, b in zip(v.shape, r.shape, strict=True)]
        v, r = _pad(v, shape), _pad(r, shape)
    return float(torch.linalg.vector_norm(v - r))


def _pad(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
