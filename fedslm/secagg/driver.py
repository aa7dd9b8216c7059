"""The coordinator's side of the protocol's stages 1-3 (its "rounds", not the federation's),
independent of the transport.

Round 0 (the key adverts) rides on the training replies; ``run_secagg_stages`` then sends each
later stage to the sites that completed the previous one through ``exchange``, a function the Flower
ServerApp implements with ``grid.send_and_receive`` (and tests with plain ``SecAggSite``
objects). A site whose reply is missing (error, timeout, refusal) or malformed at any stage is
a dropout, recorded once with its stage and reason; the protocol tolerates dropouts down to the
threshold, below it the session fails with the reason and nothing is aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from fedslm.secagg.coordinator import SecAggCoordinator
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
)

STAGES = ("share-keys", "masked-input", "unmask")
Reply = TypeVar("Reply", EncryptedShares, MaskedInput, UnmaskShares)


@dataclass(frozen=True)
class NoReply:
    """What an ``exchange`` answers for a site whose reply did not come or cannot be used,
    with the transport's reason (an error reply, a refusal, an undecodable message)."""

    reason: str


# (stage, {site id: request}) -> {site id: reply or NoReply}; a site left out of the answer
# (or answered with NoReply) dropped out
Exchange = Callable[[str, Mapping[int, object]], Mapping[int, object]]


@dataclass(frozen=True)
class Dropout:
    """One site leaving the session: at which stage (the request it did not answer) and why."""

    site_id: int
    stage: str
    reason: str

    def __str__(self) -> str:
        return f"site {self.site_id} dropped out at stage {self.stage!r} ({self.reason})"


@dataclass
class SessionOutcome:
    """How a session ended: the unmasked sum, or why there is none, and who dropped where
    (each dropout once, in the order the stages ran)."""

    result: SecAggResult | None
    failure: str | None = None
    dropouts: list[Dropout] = field(default_factory=list)


def _sender(reply: object) -> int | None:
    for name in ("sender", "site_id"):
        if hasattr(reply, name):
            return int(getattr(reply, name))
    return None


def run_secagg_stages(
    params: SecAggParams,
    adverts: Sequence[KeyAdvert],
    exchange: Exchange,
    vector_length: int | None = None,
) -> SessionOutcome:
    """Run the protocol's stages 1-3 (``share-keys``, ``masked-input``, ``unmask``) of one
    federation round after the sites' key ``adverts``; never raises SecAggError (a failed
    session is an outcome, the federation goes on with the next round). A masked input that is
    not a ``vector_length`` vector of the ring dtype counts as a dropout rather than spoiling
    the sum."""
    coordinator = SecAggCoordinator(params)
    dropouts: list[Dropout] = []

    def ask(stage: str, requests: Mapping[int, object], expected: type[Reply]) -> list[Reply]:
        answers = exchange(stage, requests)
        good = []
        for site_id in requests:
            reply = answers.get(site_id)
            if reply is None:
                dropouts.append(Dropout(site_id, stage, "no reply"))
            elif isinstance(reply, NoReply):
                dropouts.append(Dropout(site_id, stage, reply.reason))
            elif (
                not isinstance(reply, expected)
                or _sender(reply) != site_id
                or (isinstance(reply, MaskedInput) and not _fits(reply, params, vector_length))
            ):
                dropouts.append(Dropout(site_id, stage, "malformed reply"))
            else:
                good.append(reply)
        return good

    try:
        roster = coordinator.collect_keys(list(adverts))
        shares = ask("share-keys", {i: roster for i in roster.site_ids}, EncryptedShares)
        inboxes = coordinator.relay_shares(shares)
        masked = ask("masked-input", dict(sorted(inboxes.items())), MaskedInput)
        request = coordinator.collect_masked(masked)
        replies = ask("unmask", {i: request for i in request.survivors}, UnmaskShares)
        result = coordinator.unmask(replies)
    except SecAggError as e:
        return SessionOutcome(None, str(e), dropouts)
    return SessionOutcome(result, None, dropouts)


def _fits(m: MaskedInput, params: SecAggParams, length: int | None) -> bool:
    v = m.vector
    return v.dtype == params.dtype and v.ndim == 1 and (length is None or v.size == length)


def site_stage(
    params: SecAggParams,
    state: dict,
    stage: str,
    request: object,
    update: object = None,
    weight: int = 1,
) -> tuple[object, dict]:
    """A site's answer to one stage, from and to its ``SecAggSite.to_state()`` (a ClientApp
    may run each message in a fresh process, so the state travels through ``Context.state``).
    ``update`` (the flat float update) and ``weight`` are needed at ``masked-input`` only."""
    from fedslm.secagg.site import SecAggSite

    if stage not in STAGES:
        raise SecAggError(f"unknown secure-aggregation stage {stage!r}; expected one of {STAGES}")
    site = SecAggSite.from_state(params, state)
    reply: object
    if stage == "share-keys" and isinstance(request, KeyRoster):
        reply = site.share_keys(request)
    elif stage == "masked-input" and isinstance(request, ShareInbox):
        if not isinstance(update, np.ndarray):
            raise SecAggError("masked-input needs the site's update as a numpy vector")
        reply = site.masked_input(request, update, weight)
    elif stage == "unmask" and isinstance(request, UnmaskRequest):
        reply = site.unmask(request)
    else:
        raise SecAggError(f"a {stage} request cannot be a {type(request).__name__}")
    return reply, site.to_state()
