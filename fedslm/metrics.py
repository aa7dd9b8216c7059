"""Classification scores shared by every way fedslm classifies (a head, or label words)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def f1_per_label(
    gold: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray
) -> dict[int, float]:
    """F1 of each label present in ``gold`` (0.0 where it is never predicted right).

    The mean of these values is the macro-F1 over the labels present (what scikit-learn's
    ``f1_score(gold, pred, labels=present, average="macro")`` gives).
    """
    g, p = np.asarray(gold), np.asarray(pred)
    out: dict[int, float] = {}
    for label in np.unique(g):
        tp = int(np.sum((g == label) & (p == label)))
        fp = int(np.sum((g != label) & (p == label)))
        fn = int(np.sum((g == label) & (p != label)))
        out[int(label)] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def macro_f1(gold: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray) -> float:
    """The mean F1 over the labels present in ``gold`` (NaN when there are no rows)."""
    f1 = f1_per_label(gold, pred)
    return float(np.mean(list(f1.values()))) if f1 else float("nan")
