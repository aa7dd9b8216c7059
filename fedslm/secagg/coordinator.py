"""The coordinator's side: collect, relay, sum, and remove the masks from the sum.

The coordinator holds only public keys, ciphertexts it cannot open, one running ring sum of the
masked inputs (never a list of them) and, in round 3, at least ``t`` shares of the secrets it
needs: the self-mask seeds of the survivors and the mask keys of the sites that dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedslm.secagg import crypto, shamir
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
    check_site_ids,
)
from fedslm.secagg.quantize import decode, sum_error_bound
from fedslm.secagg.site import pair_seed


class SecAggCoordinator:
    """The coordinator in one session; call the four steps in order, one per round."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.stage = 0
        self._roster: dict[int, tuple[bytes, bytes]] = {}  # U1
        self._u2: list[int] = []
        self._u3: list[int] = []
        self._total: np.ndarray | None = None

    def collect_keys(self, adverts: Sequence[KeyAdvert]) -> KeyRoster:
        """End of round 0: U1 and its keys, to send to every site of U1."""
        self._enter(0)
        ids = [a.site_id for a in adverts]
        keys = [k for a in adverts for k in (a.cipher_pk, a.mask_pk)]
        check_site_ids(ids, "round 0 (advertise keys)")
        if len(ids) > self.params.n_sites:
            raise SecAggError(
                f"round 0 (advertise keys): {len(ids)} sites, more than n_sites "
                f"{self.params.n_sites}"
            )
        if any(len(k) != crypto.KEY_BYTES for k in keys) or len(set(keys)) != len(keys):
            # distinct keys: a site replaying another's key would share its masks
            raise SecAggError("round 0 (advertise keys): public keys are malformed or repeated")
        self._need(len(ids), self.params.n_sites, 0, "advertised keys")
        self._roster = {a.site_id: (a.cipher_pk, a.mask_pk) for a in adverts}
        u1 = sorted(self._roster)
        return KeyRoster(u1, [self._roster[i][0] for i in u1], [self._roster[i][1] for i in u1])

    def relay_shares(self, messages: Sequence[EncryptedShares]) -> dict[int, ShareInbox]:
        """End of round 1: U2 is who sent shares; each member of U2 gets the ciphertexts the
        others addressed to it (relayed unopened)."""
        self._enter(1)
        by_sender: dict[int, dict[int, bytes]] = {}
        for m in messages:
            expected = sorted(set(self._roster) - {m.sender})
            if m.sender not in self._roster or m.sender in by_sender:
                raise SecAggError(f"round 1 (share keys): unexpected shares from site {m.sender}")
            if sorted(m.recipients) != expected or len(m.recipients) != len(m.ciphertexts):
                raise SecAggError(
                    f"round 1 (share keys): site {m.sender} did not address one share to each "
                    "other member of U1"
                )
            by_sender[m.sender] = dict(zip(m.recipients, m.ciphertexts, strict=True))
        self._need(len(by_sender), len(self._roster), 1, "shared keys")
        self._u2 = sorted(by_sender)
        return {
            r: ShareInbox(
                r,
                [s for s in self._u2 if s != r],
                [by_sender[s][r] for s in self._u2 if s != r],
            )
            for r in self._u2
        }

    def collect_masked(self, inputs: Sequence[MaskedInput]) -> UnmaskRequest:
        """End of round 2: add the masked inputs up (mod 2^k); U3 is who sent one. The request
        goes to every site of U3."""
        self._enter(2)
        dtype, seen = self.params.dtype, set()
        for m in inputs:
            v = m.vector
            if m.site_id not in self._u2 or m.site_id in seen:
                raise SecAggError(f"round 2 (masked input): unexpected input from site {m.site_id}")
            if v.dtype != dtype or v.ndim != 1 or v.size < 2:
                raise SecAggError(
                    f"round 2 (masked input): site {m.site_id} sent a {v.dtype} array of shape "
                    f"{v.shape}; expected a 1-D {dtype} vector"
                )
            if self._total is None:
                self._total = v.astype(dtype, copy=True)
            elif v.size != self._total.size:
                raise SecAggError(
                    f"round 2 (masked input): site {m.site_id} sent {v.size} values, "
                    f"others {self._total.size}"
                )
            else:
                np.add(self._total, v, out=self._total)
            seen.add(m.site_id)
        self._need(len(seen), len(self._u2), 2, "sent a masked input")
        self._u3 = sorted(seen)
        return UnmaskRequest(list(self._u3))

    def unmask(self, replies: Sequence[UnmaskShares]) -> SecAggResult:
        """End of round 3: reconstruct each survivor's self-mask seed and each dropped site's
        mask key from ``t`` shares, strip those masks, and decode the sum."""
        self._enter(3)
        p, u3, total = self.params, self._u3, self._total
        assert total is not None
        dropped = [j for j in self._u2 if j not in set(u3)]
        seeds: dict[int, dict[int, bytes]] = {j: {} for j in u3}
        keys: dict[int, dict[int, bytes]] = {j: {} for j in dropped}
        responders: set[int] = set()
        for r in replies:
            if r.site_id not in self._u2 or r.site_id in responders:
                raise SecAggError(f"round 3 (unmasking): unexpected reply from site {r.site_id}")
            if (
                list(r.self_mask_owners) != u3
                or list(r.key_owners) != dropped
                or len(r.self_mask_shares) != len(u3)
                or len(r.key_shares) != len(dropped)
            ):
                raise SecAggError(
                    f"round 3 (unmasking): site {r.site_id} sent shares for the wrong sites"
                )
            for j, share in zip(u3, r.self_mask_shares, strict=True):
                seeds[j][r.site_id] = share
            for j, share in zip(dropped, r.key_shares, strict=True):
                keys[j][r.site_id] = share
            responders.add(r.site_id)
        self._need(len(responders), len(u3), 3, "sent their shares")
        n = total.size
        for j in u3:
            seed = crypto.kdf(self._combine(seeds[j], j, "self-mask seed"), p.session, b"self-mask")
            np.subtract(total, crypto.prg(seed, n, p.dtype), out=total)
        for j in dropped:
            sk = self._combine(keys[j], j, "mask key")
            if crypto.public_key(sk) != self._roster[j][1]:
                raise SecAggError(
                    f"round 3 (unmasking): the shares of site {j}'s mask key do not match its "
                    "public key (a site sent a corrupt share)"
                )
            for k in u3:
                mask = crypto.prg(pair_seed(sk, k, self._roster[k][1], j, p), n, p.dtype)
                # survivor k added +PRG(s_kj) when j > k and -PRG(s_kj) when j < k: undo it
                (np.subtract if j > k else np.add)(total, mask, out=total)
        weighted_sum, weight = decode(total, p)
        self._total = None
        return SecAggResult(weighted_sum, weight, list(u3), dropped, sum_error_bound(weight, p))

    # -- helpers ----------------------------------------------------------------------------

    def _combine(self, shares: dict[int, bytes], owner: int, what: str) -> bytes:
        try:
            return shamir.combine(shares, self.params.t)
        except ValueError as e:
            raise SecAggError(
                f"round 3 (unmasking): cannot rebuild site {owner}'s {what}: {e}"
            ) from e

    def _need(self, count: int, of: int, round_num: int, verb: str) -> None:
        if count < self.params.t:
            raise SecAggError(
                f"secure aggregation round {round_num}: only {count} of {of} sites {verb}; "
                f"the threshold is {self.params.t}, so the sum cannot be recovered and nothing "
                "was aggregated"
            )

    def _enter(self, round_num: int) -> None:
        if self.stage != round_num:
            raise SecAggError(
                f"coordinator step for round {round_num} called out of order (at {self.stage})"
            )
        self.stage += 1
