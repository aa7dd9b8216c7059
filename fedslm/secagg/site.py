"""A site's side of the protocol: four calls, one per round, each answering one message.

Between rounds the whole state is ``to_state()`` (ints, bytes and lists of them), so a Flower
ClientApp that starts a fresh process per message can keep it in ``Context.state`` and rebuild
the site with ``from_state``. That state holds private keys and the self-mask seed: it must
never leave the site.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fedslm.secagg import crypto, shamir
from fedslm.secagg.messages import (
    MAX_SITE_ID,
    EncryptedShares,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    SecAggError,
    SecAggParams,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
    check_site_ids,
)
from fedslm.secagg.quantize import encode

_ROUNDS = ("advertise keys", "share keys", "masked input", "unmasking")


class SecAggSite:
    """One site in one secure-aggregation session (fresh keys and seeds per session)."""

    def __init__(self, params: SecAggParams, site_id: int) -> None:
        if not 1 <= site_id <= MAX_SITE_ID:
            raise ValueError(f"site id must be in [1, 2^64), got {site_id}")
        self.params = params
        self.site_id = site_id
        self.stage = 0  # the next round this site will run; 4 when done
        self.clipped = 0  # coordinates of this site's update that were clipped (local only)
        self._cipher_sk = self._mask_sk = self._self_seed = b""
        self._roster: dict[int, tuple[bytes, bytes]] = {}  # U1: id -> (cipher pk, mask pk)
        self._u2: list[int] = []
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # owner -> (seed share, key share)

    # -- round 0 ----------------------------------------------------------------------------

    def advertise(self) -> KeyAdvert:
        """Round 0: make the two key pairs and publish their public halves."""
        self._enter(0)
        self._cipher_sk, cipher_pk = crypto.keypair()
        self._mask_sk, mask_pk = crypto.keypair()
        return KeyAdvert(self.site_id, cipher_pk, mask_pk)

    # -- round 1 ----------------------------------------------------------------------------

    def share_keys(self, roster: KeyRoster) -> EncryptedShares:
        """Round 1: Shamir-share the self-mask seed and the mask private key among U1 and
        encrypt each other member's shares for it alone."""
        self._enter(1)
        p = self.params
        ids = list(roster.site_ids)
        if not len(ids) == len(roster.cipher_pks) == len(roster.mask_pks):
            raise SecAggError("round 1 (share keys): the key roster's lists differ in length")
        check_site_ids(ids, "round 1 (share keys)")
        if not p.t <= len(ids) <= p.n_sites:
            raise SecAggError(
                f"round 1 (share keys): the roster has {len(ids)} sites, not within threshold "
                f"{p.t} .. n_sites {p.n_sites}"
            )
        own = dict(zip(ids, zip(roster.cipher_pks, roster.mask_pks, strict=True), strict=True))
        mine = (crypto.public_key(self._cipher_sk), crypto.public_key(self._mask_sk))
        if own.get(self.site_id) != mine:
            raise SecAggError(
                f"round 1 (share keys): the roster does not hold site {self.site_id}'s keys"
            )
        self._roster = own
        self._self_seed = os.urandom(shamir.SECRET_BYTES)
        seed_shares = shamir.split(self._self_seed, p.t, ids)
        key_shares = shamir.split(self._mask_sk, p.t, ids)
        self._shares = {self.site_id: (seed_shares[self.site_id], key_shares[self.site_id])}
        recipients = [j for j in ids if j != self.site_id]
        blobs = [
            crypto.encrypt(
                self._share_key(self.site_id, j),
                seed_shares[j] + key_shares[j],
                self._aad(self.site_id, j),
            )
            for j in recipients
        ]
        return EncryptedShares(self.site_id, recipients, blobs)

    # -- round 2 ----------------------------------------------------------------------------

    def masked_input(self, inbox: ShareInbox, update: np.ndarray, weight: int = 1) -> MaskedInput:
        """Round 2: check and keep the shares addressed to this site, then send
        ``weight * q(update) ++ [weight] + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)``
        over U2 (mod 2^k). A share that fails authentication is an error naming its sender,
        raised before this site reveals anything about its input."""
        self._enter(2)
        me, p = self.site_id, self.params
        senders = list(inbox.senders)
        if inbox.recipient != me or len(senders) != len(inbox.ciphertexts):
            raise SecAggError(f"round 2 (masked input): malformed share inbox for site {me}")
        if len(set(senders)) != len(senders) or not set(senders) <= set(self._roster) - {me}:
            raise SecAggError(f"round 2 (masked input): share senders {senders} are not in U1")
        u2 = sorted([*senders, me])
        if len(u2) < p.t:
            raise SecAggError(
                f"round 2 (masked input): {len(u2)} of {len(self._roster)} sites shared keys; "
                f"threshold is {p.t}"
            )
        for j, blob in zip(senders, inbox.ciphertexts, strict=True):
            plain = crypto.decrypt(self._share_key(j, me), blob, self._aad(j, me))
            if plain is None or len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggError(
                    f"round 2 (masked input): the key shares site {j} sent to site {me} failed "
                    "authentication (altered in transit or not encrypted for this site)"
                )
            self._shares[j] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        self._u2 = u2
        y, self.clipped = encode(update, weight, p)
        seed = crypto.kdf(self._self_seed, p.session, b"self-mask")
        np.add(y, crypto.prg(seed, y.size, p.dtype), out=y)
        for j in u2:
            if j == me:
                continue
            mask = crypto.prg(
                pair_seed(self._mask_sk, j, self._roster[j][1], me, p), y.size, p.dtype
            )
            # i adds PRG(s_ij) for j > i and j subtracts it: each pair's masks cancel in the sum
            (np.add if j > me else np.subtract)(y, mask, out=y)
        return MaskedInput(me, y)

    # -- round 3 ----------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Round 3: shares of b_j for every survivor j and of the mask key of every site that
        shared keys but sent no input. Answered once per session: two different survivor lists
        could otherwise reveal both secrets of one site, and with them its input."""
        self._enter(3)
        u3 = sorted(request.survivors)
        if len(set(u3)) != len(u3) or not set(u3) <= set(self._u2):
            raise SecAggError(
                f"round 3 (unmasking): survivors {u3} are not a subset of U2 {self._u2}"
            )
        if len(u3) < self.params.t:
            raise SecAggError(
                f"round 3 (unmasking): {len(u3)} of {len(self._u2)} sites sent a masked input; "
                f"threshold is {self.params.t}"
            )
        dropped = [j for j in self._u2 if j not in set(u3)]
        return UnmaskShares(
            self.site_id,
            u3,
            [self._shares[j][0] for j in u3],
            dropped,
            [self._shares[j][1] for j in dropped],
        )

    # -- state between processes ------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume, as ints, bytes and lists (secret: keep it on site)."""
        owners = sorted(self._shares)
        return {
            "site_id": self.site_id,
            "stage": self.stage,
            "clipped": self.clipped,
            "cipher_sk": self._cipher_sk,
            "mask_sk": self._mask_sk,
            "self_seed": self._self_seed,
            "roster_ids": list(self._roster),
            "roster_cipher_pks": [k[0] for k in self._roster.values()],
            "roster_mask_pks": [k[1] for k in self._roster.values()],
            "u2": list(self._u2),
            "share_owners": owners,
            "seed_shares": [self._shares[j][0] for j in owners],
            "key_shares": [self._shares[j][1] for j in owners],
        }

    @classmethod
    def from_state(cls, params: SecAggParams, state: dict[str, Any]) -> SecAggSite:
        """The site ``to_state`` described, under the same ``params``."""
        site = cls(params, int(state["site_id"]))
        site.stage, site.clipped = int(state["stage"]), int(state["clipped"])
        site._cipher_sk, site._mask_sk = state["cipher_sk"], state["mask_sk"]
        site._self_seed = state["self_seed"]
        pks = zip(state["roster_cipher_pks"], state["roster_mask_pks"], strict=True)
        site._roster = dict(zip(state["roster_ids"], pks, strict=True))
        site._u2 = list(state["u2"])
        shares = zip(state["seed_shares"], state["key_shares"], strict=True)
        site._shares = dict(zip(state["share_owners"], shares, strict=True))
        return site

    # -- helpers ----------------------------------------------------------------------------

    def _enter(self, round_num: int) -> None:
        if self.stage != round_num:
            done = "finished" if self.stage >= len(_ROUNDS) else f"at round {self.stage}"
            raise SecAggError(
                f"round {round_num} ({_ROUNDS[round_num]}) called out of order: site "
                f"{self.site_id} is {done}"
            )
        self.stage += 1

    def _share_key(self, sender: int, recipient: int) -> bytes:
        # One key per direction: i->j and j->i never encrypt under the same key
        peer = recipient if sender == self.site_id else sender
        try:
            return crypto.agree(
                self._cipher_sk,
                self._roster[peer][0],
                self.params.session,
                b"share-key" + crypto.ids(sender, recipient),
            )
        except ValueError as e:
            raise SecAggError(f"site {peer}'s public key is unusable: {e}") from e

    def _aad(self, sender: int, recipient: int) -> bytes:
        return self.params.session + crypto.ids(sender, recipient)


def pair_seed(mask_sk: bytes, peer: int, peer_mask_pk: bytes, me: int, p: SecAggParams) -> bytes:
    """The PRG seed s_ij shared by ``me`` and ``peer`` (either side computes the same)."""
    lo, hi = sorted((me, peer))
    try:
        return crypto.agree(mask_sk, peer_mask_pk, p.session, b"pair-mask" + crypto.ids(lo, hi))
    except ValueError as e:
        raise SecAggError(f"site {peer}'s mask public key is unusable: {e}") from e
