"""Secure aggregation of site updates (Bonawitz et al. 2017, semi-honest variant), without Flower.

The coordinator learns the weighted sum of the surviving sites' quantised updates and the sum
of their weights, never one site's update, weight or key shares. Four rounds, each one message
from every site and one reply from the coordinator:

0. advertise keys: each site makes two X25519 key pairs (share encryption, pairwise masks).
1. share keys: each site Shamir-shares (threshold t) its self-mask seed b_i and its mask private
   key among U1 and encrypts each share for its holder (X25519 + HKDF -> ChaCha20-Poly1305);
   the coordinator relays ciphertexts.
2. masked input: ``y_i = w_i q(x_i) ++ [w_i] + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i}
   PRG(s_ij)  (mod 2^k)`` over U2, the sites that completed round 1; the coordinator sums.
3. unmasking: survivors send shares of b_j for every j in U3 (input received) and of the mask
   key of every j in U2 \\ U3 (dropped after sharing keys); with t shares the coordinator
   removes the self masks and the dropped sites' unmatched pairwise masks.

Every pair of sites is masked (Bonawitz's complete graph, not SecAgg+'s sparse one). Against a
coordinator that follows the protocol, even together with fewer than t sites, a site's input
stays hidden. Not covered: a coordinator that lies about who dropped or forges keys (no
signatures or consistency round), and sites that submit harmful updates (the coordinator cannot
screen what it cannot see). ``run_session_in_process`` runs a whole session in one process, for
tests and benchmarks.
"""

from fedslm.secagg.coordinator import SecAggCoordinator
from fedslm.secagg.inprocess import InProcessRun, run_session_in_process
from fedslm.secagg.messages import (
    EncryptedShares,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    SecAggError,
    SecAggParams,
    SecAggResult,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
    default_threshold,
)
from fedslm.secagg.quantize import decode, encode, quantize, sum_error_bound
from fedslm.secagg.site import SecAggSite

__all__ = [
    "EncryptedShares",
    "InProcessRun",
    "KeyAdvert",
    "KeyRoster",
    "MaskedInput",
    "SecAggCoordinator",
    "SecAggError",
    "SecAggParams",
    "SecAggResult",
    "SecAggSite",
    "ShareInbox",
    "UnmaskRequest",
    "UnmaskShares",
    "decode",
    "default_threshold",
    "encode",
    "quantize",
    "run_session_in_process",
    "sum_error_bound",
]
