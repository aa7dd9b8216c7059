"""Public parameters, the error type and the messages of the protocol, in the order they travel.

Every message field is an int, bytes, a list of those, or (``MaskedInput.vector``) one integer
numpy array, so ``dataclasses.asdict`` of a message fits a Flower ConfigRecord and the vector
an ArrayRecord.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedslm.errors import FederationError

MAX_SITE_ID = 2**64 - 1  # Flower node ids are uint64, so they can serve as site ids directly


class SecAggError(FederationError):
    """Secure aggregation cannot proceed: too few sites left, or a message failed a check."""


def check_site_ids(ids: list[int], where: str) -> None:
    """SecAggError unless the ids are distinct ints in [1, 2^64): Shamir x-coordinates (never
    0) that also fit the 8 bytes they take in key labels."""
    if len(set(ids)) != len(ids) or not all(
        isinstance(i, int) and 1 <= i <= MAX_SITE_ID for i in ids
    ):
        raise SecAggError(f"{where}: site ids {ids} must be distinct integers in [1, 2^64)")


def default_threshold(n_sites: int) -> int:
    """A majority of the roster (at least 2): tolerates fewer than half of the sites dropping."""
    return max(2, n_sites // 2 + 1)


@dataclass(frozen=True)
class SecAggParams:
    """What every party knows before round 0 (from the job config and the round).

    ``session`` must be unique per aggregation (e.g. run id and round): every key, mask and
    ciphertext is bound to it. ``n_sites`` is the most sites that may take part. Each site's
    update is clipped to ``[-clip_range, clip_range]`` and rounded to a grid of ``step =
    clip_range / (2**(bits-1) - 1)``; its weight is an integer in ``[1, max_weight]`` (record
    count). The ring is ``2**ring_bits``, 32 when the largest possible weighted sum fits, else 64.
    """

    session: bytes
    n_sites: int
    clip_range: float
    threshold: int | None = None  # None: default_threshold(n_sites)
    bits: int = 24
    max_weight: int = 2**20

    def __post_init__(self) -> None:
        if not self.session:
            raise ValueError("secure aggregation needs a non-empty session id")
        if self.n_sites < 2:
            raise ValueError(f"secure aggregation needs at least 2 sites, got {self.n_sites}")
        t = self.t
        if not 2 <= t <= self.n_sites:
            raise ValueError(f"threshold must be in [2, n_sites={self.n_sites}], got {t}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive number, got {self.clip_range}")
        if not 2 <= self.bits <= 53:  # float64 must hold every grid point exactly
            raise ValueError(f"bits must be in [2, 53], got {self.bits}")
        if self.max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {self.max_weight}")
        if self._largest_sum() >= 2**63:
            raise ValueError(
                f"n_sites * max_weight * 2**(bits-1) = {self._largest_sum():.3g} does not fit a "
                "64-bit ring: lower bits or max_weight"
            )

    @property
    def t(self) -> int:
        """The Shamir threshold: the fewest sites that must survive every round."""
        return default_threshold(self.n_sites) if self.threshold is None else self.threshold

    @property
    def qmax(self) -> int:
        """Largest quantised magnitude of one coordinate (before weighting)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def step(self) -> float:
        """Quantisation step; rounding moves each coordinate by at most ``step / 2``."""
        return self.clip_range / self.qmax

    def _largest_sum(self) -> int:
        # |sum_i w_i q_i| <= n * max_weight * qmax, and the weight coordinate is smaller still
        return self.n_sites * self.max_weight * self.qmax

    @property
    def ring_bits(self) -> int:
        """k of the ring Z/2^k: the sum is recovered exactly while it stays below 2^(k-1)."""
        return 32 if self._largest_sum() < 2**31 else 64

    @property
    def dtype(self) -> np.dtype:
        """The wire dtype of masked vectors (little-endian, whatever the machine)."""
        return np.dtype("<u4" if self.ring_bits == 32 else "<u8")


# -- round 0: advertise keys ----------------------------------------------------------------


@dataclass(frozen=True)
class KeyAdvert:
    """Site -> coordinator: the site's two X25519 public keys (32 bytes each)."""

    site_id: int
    cipher_pk: bytes  # for the AEAD keys that protect shares in transit
    mask_pk: bytes  # for the pairwise mask seeds


@dataclass(frozen=True)
class KeyRoster:
    """Coordinator -> every advertising site: U1, the sites and keys of this session."""

    site_ids: list[int]
    cipher_pks: list[bytes]
    mask_pks: list[bytes]


# -- round 1: share keys --------------------------------------------------------------------


@dataclass(frozen=True)
class EncryptedShares:
    """Site -> coordinator: one AEAD ciphertext per other member of U1 (the coordinator relays
    them; it cannot read them)."""

    sender: int
    recipients: list[int]
    ciphertexts: list[bytes]


@dataclass(frozen=True)
class ShareInbox:
    """Coordinator -> each site of U2: the ciphertexts addressed to it by the other members of
    U2 (the sites that completed round 1)."""

    recipient: int
    senders: list[int]
    ciphertexts: list[bytes]


# -- round 2: masked input ------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedInput:
    """Site -> coordinator: ``y = weight * quantised update ++ [weight] + masks (mod 2^k)``."""

    site_id: int
    vector: np.ndarray  # SecAggParams.dtype, length = update size + 1


# -- round 3: unmasking ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnmaskRequest:
    """Coordinator -> sites: U3, the sites whose masked input arrived."""

    survivors: list[int]


@dataclass(frozen=True)
class UnmaskShares:
    """Site -> coordinator: shares of the self-mask seed of every survivor and of the mask
    private key of every site that shared keys but sent no input (never both for one site)."""

    site_id: int
    self_mask_owners: list[int]
    self_mask_shares: list[bytes]
    key_owners: list[int]
    key_shares: list[bytes]


@dataclass(frozen=True)
class SecAggResult:
    """What the coordinator learns: the weighted sum of the survivors' updates and their total
    weight. ``sum_error_bound`` bounds ``|weighted_sum - sum_i w_i clip(x_i)|`` per coordinate."""

    weighted_sum: np.ndarray  # float64
    total_weight: int
    survivors: list[int]  # U3: whose inputs are in the sum
    dropped: list[int]  # shared keys (U2) but sent no input
    sum_error_bound: float

    def mean(self) -> np.ndarray:
        """The weighted mean (float64); within ``step / 2`` of the clipped inputs' mean."""
        return self.weighted_sum / self.total_weight
