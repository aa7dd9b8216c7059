"""Deterministic splitting of row indices into sites and into train/eval parts.

Everything here is a pure function of its arguments and a seed, so a simulation can be re-run
and give the same sites. Parts are returned sorted so they are easy to read and compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedslm.errors import DataError

_MAX_TRIES = 100


def _rng(seed: int) -> np.random.Generator:
    # numpy refuses negative seeds; a config's seed may be any int
    return np.random.default_rng(seed % 2**64)


def _sorted_parts(parts: Sequence[Sequence[int] | np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in part) for part in parts]


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def split_iid(n: int, k: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(n)`` into ``k`` parts whose sizes differ by at most 1."""
    _check_k(k)
    if n < k:
        raise DataError(f"the data set has {n} rows, fewer than the {k} sites; use fewer sites")
    perm = _rng(seed).permutation(n)
    return _sorted_parts(np.array_split(perm, k))


def _by_label(labels: Sequence[str]) -> dict[str, list[int]]:
    """Indices of each label, labels in sorted order so the draws do not depend on row order."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return {label: groups[label] for label in sorted(groups)}


def split_dirichlet(
    labels: Sequence[str], k: int, alpha: float, seed: int, min_size: int = 2
) -> list[list[int]]:
    """Label-skewed (non-IID) split into ``k`` parts.

    For each label, its rows are shared across the parts in proportions drawn from
    Dirichlet(``alpha``); small ``alpha`` gives each part few labels. A part that already holds
    ``n / k`` rows takes no more. Draws are repeated (up to 100 times) until every part has at
    least ``min_size`` rows; otherwise ``DataError``.
    """
    _check_k(k)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    n = len(labels)
    too_small = DataError(
        f"the data set ({n} rows) is too small to split into {k} sites of at least {min_size} "
        f"rows each with a Dirichlet split at alpha={alpha}; use a larger data.split.alpha "
        "(less skew), fewer sites, or more data"
    )
    if n < k * min_size:
        raise too_small
    rng = _rng(seed)
    groups = _by_label(labels)
    for _ in range(_MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(k)]
        for indices in groups.values():
            shuffled = rng.permutation(indices)
            props = rng.dirichlet([alpha] * k)
            # as in NIID-Bench: a site already holding its even share gets no more, which keeps
            # sizes usable without removing the label skew
            open_sites = np.array([len(part) < n / k for part in parts], dtype=float)
            props = props * open_sites
            if not np.all(np.isfinite(props)) or props.sum() <= 0:
                continue
            props = props / props.sum()
            cuts = (np.cumsum(props)[:-1] * len(shuffled)).round().astype(int)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.extend(int(i) for i in chunk)
        if sum(map(len, parts)) == n and min(map(len, parts)) >= min_size:
            return _sorted_parts(parts)
    raise too_small


def split_by_column(values: Sequence[str], names: Sequence[str]) -> list[list[int]]:
    """For each name, the indices of rows whose value equals it (other rows are left out)."""
    wanted = {name: i for i, name in enumerate(names)}
    parts: list[list[int]] = [[] for _ in names]
    for index, value in enumerate(values):
        slot = wanted.get(value)
        if slot is not None:
            parts[slot].append(index)
    empty = [name for name, part in zip(names, parts, strict=True) if not part]
    if empty:
        present = sorted(set(values))
        shown = ", ".join(repr(v) for v in present[:20]) + (" ..." if len(present) > 20 else "")
        raise DataError(
            f"no rows for site(s) {', '.join(repr(e) for e in empty)}; the values present are "
            f"{shown}. Make the site names in federation.sites match these values"
        )
    return parts


def _eval_counts(sizes: list[int], n_eval: int, fraction: float) -> list[int]:
    """Eval rows per label summing to ``n_eval``: proportional, largest remainder first, and
    never taking a label's last training row."""
    caps = [max(size - 1, 0) for size in sizes]
    quotas = [size * fraction for size in sizes]
    counts = [min(int(q), cap) for q, cap in zip(quotas, caps, strict=True)]
    n_eval = min(n_eval, sum(caps))
    # stable sort: ties go to the label that sorts first, keeping this deterministic
    order = sorted(range(len(sizes)), key=lambda j: -(quotas[j] - int(quotas[j])))
    while sum(counts) < n_eval:
        for j in order:
            if sum(counts) >= n_eval:
                break
            if counts[j] < caps[j]:
                counts[j] += 1
    return counts


def train_eval_split(
    n: int,
    eval_fraction: float,
    seed: int,
    labels: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (train, eval) with about ``eval_fraction`` of rows in eval.

    Both parts get at least one row. With ``labels``, the split is stratified: each label keeps
    its share in eval, and a label with two or more rows keeps at least one in train.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    if n < 2:
        raise DataError(
            f"{n} row(s) is too few to hold some out for evaluation; a site needs at least 2"
        )
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} rows")
    rng = _rng(seed)
    n_eval = min(max(round(n * eval_fraction), 1), n - 1)
    if labels is None:
        perm = rng.permutation(n)
        return sorted(int(i) for i in perm[n_eval:]), sorted(int(i) for i in perm[:n_eval])
    groups = [rng.permutation(idx) for idx in _by_label(labels).values()]
    counts = _eval_counts([len(g) for g in groups], n_eval, eval_fraction)
    if sum(counts) == 0:
        # every label occurs once: no label can spare a row, but eval still needs one
        counts[int(rng.integers(len(groups)))] = 1
    train: list[int] = []
    held: list[int] = []
    for group, count in zip(groups, counts, strict=True):
        held.extend(int(i) for i in group[:count])
        train.extend(int(i) for i in group[count:])
    return sorted(train), sorted(held)
