"""t-out-of-n Shamir secret sharing of 32-byte secrets over GF(2^127 - 1).

A secret is cut into chunks of 15 bytes (15 + 15 + 2), each below the prime, and each chunk is
the constant term of its own random polynomial of degree t - 1. A share is the three
evaluations at the holder's x (its site id, never 0), 16 bytes each. Fewer than t shares are
independent of the secret (information-theoretically); any t determine it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

PRIME = 2**127 - 1
SECRET_BYTES = 32
CHUNK_BYTES = 15  # 2^120 < PRIME, so every chunk is a field element
_CHUNKS = [(i, min(i + CHUNK_BYTES, SECRET_BYTES)) for i in range(0, SECRET_BYTES, CHUNK_BYTES)]
ELEMENT_BYTES = 16
SHARE_BYTES = ELEMENT_BYTES * len(_CHUNKS)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for the holders ``xs`` (distinct, in [1, PRIME)); any ``threshold``
    of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)} holders]")
    polys = [
        [int.from_bytes(secret[a:b], "big")]
        + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        for a, b in _CHUNKS
    ]
    out = {}
    for x in xs:
        values = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):  # Horner
                acc = (acc * x + c) % PRIME
            values.append(acc.to_bytes(ELEMENT_BYTES, "big"))
        out[x] = b"".join(values)
    return out


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``{x: share}``; uses the ``threshold``
    smallest x. ValueError when there are too few shares or a share is malformed; shares that
    do not come from one polynomial yield a wrong secret or a ValueError."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot reconstruct a {threshold}-threshold secret")
    xs = tuple(sorted(shares)[:threshold])
    _check_xs(xs)
    coeffs = _lagrange_at_zero(xs)
    parts = []
    for c, (a, b) in enumerate(_CHUNKS):
        lo, hi = c * ELEMENT_BYTES, (c + 1) * ELEMENT_BYTES
        acc = 0
        for x, lam in zip(xs, coeffs, strict=True):
            share = shares[x]
            if len(share) != SHARE_BYTES:
                raise ValueError(f"share of holder {x} is {len(share)} bytes, not {SHARE_BYTES}")
            acc = (acc + lam * int.from_bytes(share[lo:hi], "big")) % PRIME
        if acc >= 1 << (8 * (b - a)):
            raise ValueError("shares are inconsistent: a reconstructed chunk is out of range")
        parts.append(acc.to_bytes(b - a, "big"))
    return b"".join(parts)


@lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    # The coordinator combines every secret from the same holders: compute the weights once
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("share holders must be distinct")
    bad = [x for x in xs if not 0 < x < PRIME]
    if bad:
        raise ValueError(f"share holder x must be in [1, 2^127 - 1), got {bad[0]}")
