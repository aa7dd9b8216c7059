"""LoRA factor algebra on PEFT adapter states: pair the factors, refactor dense updates.

PEFT adds ``(alpha/r) · B @ A`` to a layer (A: ``(r, in)``, B: ``(out, r)``). ``factorize``
turns a dense per-layer update back into factors of a chosen rank by truncated SVD (the best
approximation of that rank, with the fraction of energy dropped); ``to_site_rank`` cuts global
factors down to a site's rank. ``fedslm.aggregation.exact`` and ``ffa`` are built on these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

AdapterState = dict[str, torch.Tensor]

_FACTOR = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])\.weight$")
# A kept direction of A with no update behind it starts at the expected row norm of PEFT's own
# initialisation of A (kaiming-uniform with a=sqrt(5): variance 1/(3·in) per entry).
_NULL_ROW_NORM = math.sqrt(1.0 / 3.0)


@dataclass(frozen=True)
class LoraPair:
    """The two factors of one adapted layer: ``delta_W = (alpha/rank) · B @ A``."""

    layer: str
    a_key: str
    b_key: str
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Refactored:
    """Factors rebuilt from dense updates, and per layer the fraction of the dense update's
    Frobenius energy (sum of squared singular values) that the rank cut dropped."""

    state: AdapterState
    energy_lost: dict[str, float]


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, LoraPair]:
    """Pair every ``LAYER.lora_A.weight`` with its ``LAYER.lora_B.weight``, keyed by LAYER.

    Raises ValueError naming the key for an unpartnered factor, a factor that is not 2-D, ranks
    that disagree, or a LoRA variant this math does not cover (DoRA, embedding LoRA).
    """
    factors: dict[str, dict[str, str]] = {}
    for key in state:
        match = _FACTOR.match(key)
        if match is None:
            if any(part.startswith("lora_") for part in key.split(".")):
                raise ValueError(f"{key}: unsupported LoRA tensor (only lora_A/lora_B weights)")
            continue
        factors.setdefault(match["layer"], {})[match["which"]] = key
    pairs: dict[str, LoraPair] = {}
    for layer, keys in factors.items():
        for which, other in (("A", "B"), ("B", "A")):
            if other not in keys:
                missing = f"{layer}.lora_{other}.weight"
                raise ValueError(f"{keys[which]} has no partner {missing}")
        a, b = state[keys["A"]], state[keys["B"]]
        for key, t in ((keys["A"], a), (keys["B"], b)):
            if t.ndim != 2:
                raise ValueError(f"{key}: LoRA factor must be 2-D, got shape {tuple(t.shape)}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{keys['A']} has rank {a.shape[0]} (shape {tuple(a.shape)}) but {keys['B']} "
                f"has rank {b.shape[1]} (shape {tuple(b.shape)})"
            )
        pairs[layer] = LoraPair(layer, keys["A"], keys["B"], a.shape[0], a.shape[1], b.shape[0])
    return pairs


def lora_delta(b: torch.Tensor, a: torch.Tensor, alpha: float) -> torch.Tensor:
    """The dense update ``(alpha/r) · B @ A`` of one layer, in float64."""
    return (alpha / a.shape[0]) * (b.to(torch.float64) @ a.to(torch.float64))


def factorize(
    delta: torch.Tensor, rank: int, alpha: float, *, keep_trainable: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors ``B (out, rank)``, ``A (rank, in)`` with ``(alpha/rank) · B @ A`` the best
    rank-``rank`` approximation of ``delta``, and the fraction of its energy that was dropped.

    The singular values are split symmetrically (``sqrt(S)`` on each side). Directions the
    update does not use (zero singular values, e.g. a fresh adapter whose B is 0) get a zero
    column in B (and so do ranks beyond the update's own); with ``keep_trainable`` their row of
    A is a direction orthogonal to the other rows, at the row norm of PEFT's init, because with
    both factors zero neither ever gets a gradient again and that rank is lost for good.
    ``keep_trainable=False`` leaves them all-zero. A zero ``delta`` gives no NaN.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return _factors(u, s, vh, rank, alpha, keep_trainable)


def to_site_rank(
    state: AdapterState,
    alpha: float,
    site_rank: int,
    site_alpha: float | None = None,
    *,
    keep_trainable: bool = True,
) -> Refactored:
    """Cut global factors (any rank, scaled ``alpha/R``) to a site's rank.

    Per layer the site gets ``B_i, A_i`` with ``(site_alpha/site_rank) · B_i @ A_i`` the best
    rank-``site_rank`` approximation of ``(alpha/R) · B @ A`` (``site_alpha`` defaults to
    ``alpha``). Uses QR of the factors, so no dense ``(out, in)`` matrix is formed. Other
    tensors are copied.
    """
    if site_rank < 1:
        raise ValueError(f"site_rank must be >= 1, got {site_rank}")
    pairs = lora_pairs(state)
    out = {k: v.clone() for k, v in state.items()}
    lost: dict[str, float] = {}
    for name, p in pairs.items():
        b, a = state[p.b_key].to(torch.float64), state[p.a_key].to(torch.float64)
        # B A = Qb (Rb Ra^T) Qa^T: the SVD of the small core gives the SVD of the product
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        u, s, vh = qb @ u, s * (alpha / p.rank), vh @ qa.T
        new_b, new_a, lost[name] = _factors(
            u, s, vh, site_rank, alpha if site_alpha is None else site_alpha, keep_trainable
        )
        out[p.a_key], out[p.b_key] = new_a, new_b
    return Refactored(out, lost)


def _factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, alpha: float, trainable: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors of rank ``rank`` from the thin SVD ``u diag(s) vh`` of a dense update."""
    n_out, n_in, k = u.shape[0], vh.shape[1], s.numel()
    total = float((s**2).sum())
    # Below this, a singular value is float64 rounding of the accumulation, not signal.
    tol = float(s.max()) * max(n_out, n_in) * torch.finfo(torch.float64).eps if k else 0.0
    keep = min(rank, k)
    kept = s[:keep].clone()
    kept[kept <= tol] = 0.0
    dropped = float((s[keep:] ** 2).sum()) + float((s[:keep][kept == 0] ** 2).sum())
    lost = dropped / total if total > 0 else 0.0
    # SVD signs are arbitrary; fix them so the factors do not depend on the LAPACK build.
    u, vh = u[:, :keep].clone(), vh[:keep].clone()
    if keep:
        pivot = u.abs().argmax(dim=0)
        sign = torch.sign(u[pivot, torch.arange(keep)])
        sign[sign == 0] = 1.0
        u, vh = u * sign, vh * sign[:, None]
    root = kept.sqrt() * math.sqrt(rank / alpha)
    b = torch.zeros(n_out, rank, dtype=torch.float64)
    a = torch.zeros(rank, n_in, dtype=torch.float64)
    b[:, :keep] = u * root
    a[:keep] = root[:, None] * vh
    if trainable:
        null = (kept == 0).nonzero().flatten()
        a[null] = vh[null] * _NULL_ROW_NORM
        extra = min(rank, n_in) - keep  # rows beyond the update's SVD: use its complement
        if extra > 0:
            basis = torch.linalg.qr(vh.T, mode="complete").Q if keep else torch.eye(n_in)
            a[keep : keep + extra] = basis[:, keep : keep + extra].T * _NULL_ROW_NORM
    return b.to(torch.float32), a.to(torch.float32), lost
