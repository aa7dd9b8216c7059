"""One whole secure-aggregation session in one process, with optional drop-outs: for tests and
benchmarks (not a federated job: ``fedslm.inprocess`` runs one of those)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fedslm.secagg.coordinator import SecAggCoordinator
from fedslm.secagg.messages import SecAggParams, SecAggResult
from fedslm.secagg.site import SecAggSite

T = TypeVar("T")


@dataclass
class InProcessRun:
    """A finished session: the result, every message in the order it was sent, the site
    objects (their private state, for tests), and the seconds each call took."""

    result: SecAggResult
    messages: list[object]
    sites: dict[int, SecAggSite]
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def run_session_in_process(
    params: SecAggParams,
    updates: Sequence[np.ndarray],
    weights: Sequence[int] | None = None,
    *,
    drop_after_round1: Collection[int] = (),
    drop_after_round2: Collection[int] = (),
    via_state: bool = False,
) -> InProcessRun:
    """Run one session for sites ``1..len(updates)`` (site i holds ``updates[i-1]`` and weight
    ``weights[i-1]``, default 1). Sites in ``drop_after_round1`` share their keys and vanish
    before sending their input; sites in ``drop_after_round2`` send their input and vanish
    before unmasking. With ``via_state`` every site is rebuilt from ``to_state()`` before each
    round, as a ClientApp that runs each message in a fresh process would. Raises SecAggError
    when too few sites remain.
    """
    ids = list(range(1, len(updates) + 1))
    weights = list(weights) if weights is not None else [1] * len(ids)
    out_r1, out_r2 = set(drop_after_round1), set(drop_after_round2)
    messages: list[object] = []
    seconds: dict[str, list[float]] = defaultdict(list)
    sites = {i: SecAggSite(params, i) for i in ids}
    coordinator = SecAggCoordinator(params)

    def timed(name: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        value = fn(*args)
        seconds[name].append(time.perf_counter() - start)
        messages.append(value)
        return value

    def site(i: int) -> SecAggSite:
        if via_state:
            sites[i] = SecAggSite.from_state(params, sites[i].to_state())
        return sites[i]

    adverts = [timed("site.advertise", site(i).advertise) for i in ids]
    roster = timed("coordinator.collect_keys", coordinator.collect_keys, adverts)
    shares = [timed("site.share_keys", site(i).share_keys, roster) for i in ids]
    inboxes = timed("coordinator.relay_shares", coordinator.relay_shares, shares)
    masked = [
        timed("site.masked_input", site(i).masked_input, inboxes[i], updates[i - 1], weights[i - 1])
        for i in ids
        if i in inboxes and i not in out_r1
    ]
    request = timed("coordinator.collect_masked", coordinator.collect_masked, masked)
    replies = [
        timed("site.unmask", site(i).unmask, request) for i in request.survivors if i not in out_r2
    ]
    result = timed("coordinator.unmask", coordinator.unmask, replies)
    return InProcessRun(result, messages, sites, seconds)
