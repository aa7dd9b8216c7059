"""Fixed-point encoding of a weighted update into the ring Z/2^k, and back.

Deterministic rounding to the nearest grid point: each coordinate of ``clip(x)`` moves by at
most ``step / 2``, so a sum of N unit-weight inputs is within ``N * step / 2`` of the true sum
of the clipped inputs, a weighted sum within ``W * step / 2`` (W the total weight) and the
weighted mean within ``step / 2``. The weight multiplies the *quantised* integers, which keeps
that bound independent of the weights. No overflow: ``SecAggParams`` picks k so that
``n_sites * max_weight * qmax < 2^(k-1)``, hence the signed sum is recovered exactly.
"""

from __future__ import annotations

import numpy as np

from fedslm.secagg.messages import SecAggError, SecAggParams


def quantize(update: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, int]:
    """Flat float update -> int64 grid indices in ``[-qmax, qmax]``, and how many coordinates
    were clipped (the site may report that count; the coordinator never sees it)."""
    x = np.asarray(update, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("update has non-finite values; secure aggregation needs finite ones")
    clipped = int(np.count_nonzero(np.abs(x) > params.clip_range))
    # clip in grid units after scaling, so float rounding of clip_range/step cannot exceed qmax
    q = np.rint(np.clip(x / params.step, -params.qmax, params.qmax)).astype(np.int64)
    return q, clipped


def encode(update: np.ndarray, weight: int, params: SecAggParams) -> tuple[np.ndarray, int]:
    """``weight * quantize(update)`` with ``weight`` appended, as ring elements (wire dtype);
    also returns the clipped-coordinate count."""
    if isinstance(weight, bool) or int(weight) != weight or not 1 <= weight <= params.max_weight:
        raise SecAggError(
            f"weight must be an integer in [1, max_weight={params.max_weight}], got {weight}: "
            "raise the job's max_weight (the ring may grow to 64 bits)"
        )
    q, clipped = quantize(update, params)
    out = np.empty(q.size + 1, dtype=np.int64)
    np.multiply(q, int(weight), out=out[:-1])
    out[-1] = int(weight)
    # int64 -> uint32/uint64 wraps modulo 2^k: negative values become their ring representatives
    return out.astype(params.dtype), clipped


def decode(total: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, int]:
    """Ring sum -> (weighted sum as float64, total weight)."""
    signed = total.astype(params.dtype, copy=False).view(
        np.dtype("<i4" if params.ring_bits == 32 else "<i8")
    )
    weight = int(signed[-1])
    if weight < 1:
        raise SecAggError(f"unmasked total weight is {weight}: the masks did not cancel")
    return signed[:-1].astype(np.float64) * params.step, weight


def sum_error_bound(total_weight: int, params: SecAggParams) -> float:
    """Bound on ``|decoded weighted sum - sum_i w_i clip(x_i)|`` per coordinate: rounding
    (``W * step / 2``) plus float64's rounding of an integer of magnitude up to ``W * qmax``."""
    return total_weight * params.step / 2 + total_weight * params.clip_range * 2.0**-52
