"""Flower's SuperNode with shorter waits while a job runs: ``python -m fedslm.clients.supernode``.

Flower 1.41's SuperNode asks the SuperLink for a message and, when there is none, sleeps a
fixed 3 s before asking again; while a ClientApp works on a message it looks for the reply
every 0.5 s; and a message array the SuperLink does not have yet is asked for again after 1 s,
then 2, 4 ... s. None of these is a setting. In a federated round the next message reaches
the site just after the coordinator aggregated the previous replies, when the SuperNode has
usually just gone to sleep, so the 3 s were paid by nearly every message: with two messages
per round they were most of what a deployed round cost over a simulated one
(docs/benchmarks.md, section 11).

This entry point runs Flower's own ``flower-supernode`` with every argument as given, except
that in this process:

- while a job is running (a message was handled in the last ``ACTIVE_WINDOW_S`` seconds) the
  SuperNode's waits last at most ``--poll-interval`` seconds (``daemon.poll_interval_s``);
  otherwise at most ``--idle-poll-interval`` seconds (``daemon.idle_poll_interval_s``; 3 s,
  Flower's own, by default), so an idle site costs the coordinator what Flower's does;
- a missing message array is asked for again after 20 ms, doubling up to 0.5 s;
- the reply to the message just received is always the one waited for. Flower's loop takes a
  message, then sends whatever replies there are and takes the next message. After a
  coordinator restart a reply to a message of the stopped run can be all there is (Flower
  then drops it); the loop would go on to the next message and leave the reply that matters
  until after it, a round's timeout late. So the loop keeps sending until the reply to the
  message it took has gone.

The loop is changed by giving Flower's loop module (``flwr.supernode.start_client_internal``)
a ``time`` whose ``sleep`` is bounded, a ``pull_objects`` bound to shorter back-offs, and its
pull and push steps wrapped. ``check_flower`` verifies that the pinned Flower still has what
this module expects (a test runs it), so an upgrade that changes the loop fails loudly
instead of silently losing the speed-up.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from functools import partial, wraps
from types import ModuleType
from typing import Any

DEFAULT_POLL_S = 0.2
DEFAULT_IDLE_POLL_S = 3.0  # Flower's
ACTIVE_WINDOW_S = 60.0
# A Flower object not there yet is asked for again after 20 ms, doubling to 0.5 s (Flower's:
# 1 s, doubling to 10 s); the SuperNode and the executor use these
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.02, 0.5
# What flwr.supernode.start_client_internal must still contain (Flower 1.41)
FLOWER_WAITS = ("time.sleep(3)", "time.sleep(0.5)", "pull_objects(", "def _push_messages(",
                "def _pull_and_store_message(", "receive=receive", "send=send")  # fmt: skip


class PollClock:
    """Stands in for the ``time`` module in Flower's SuperNode loop: ``sleep`` lasts at most
    ``active_s`` within ``window_s`` of the last message handled (``handled``), else at most
    ``idle_s``; everything else is ``time``'s."""

    def __init__(
        self, active_s: float, idle_s: float, window_s: float = ACTIVE_WINDOW_S, clock: Any = time
    ) -> None:
        self.active_s, self.idle_s, self.window_s = active_s, idle_s, window_s
        self._clock = clock
        self.last_message = -float("inf")

    def handled(self) -> None:
        """A message is being handled now: the job is running."""
        self.last_message = self._clock.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, at most the poll of the moment."""
        active = self._clock.monotonic() - self.last_message < self.window_s
        self._clock.sleep(min(seconds, self.active_s if active else self.idle_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)


def check_flower() -> ModuleType:
    """Flower's SuperNode loop module, after checking that it still waits where this module
    expects; ``RuntimeError`` naming what changed otherwise."""
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    missing = [s for s in FLOWER_WAITS if s not in source]
    if missing or not isinstance(getattr(loop, "time", None), (ModuleType, PollClock)):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer has "
            f"{', '.join(missing) or 'the time module'}: this Flower version is not the one "
            "fedslm.clients.supernode was written for; check its loop before upgrading"
        )
    return loop


def shorten_waits(active_s: float, idle_s: float = DEFAULT_IDLE_POLL_S) -> PollClock:
    """Bound the SuperNode loop's waits and make it wait for the reply that matters (see the
    module's docstring), in this process; the clock that now bounds the waits."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    loop = check_flower()
    real = loop.time._clock if isinstance(loop.time, PollClock) else loop.time
    clock = PollClock(active_s, idle_s, clock=real)
    loop.time = clock  # type: ignore[attr-defined]
    exchange = Exchange()
    pull = getattr(loop._pull_and_store_message, "__wrapped__", loop._pull_and_store_message)
    loop._pull_and_store_message = _receiving(pull, exchange)  # type: ignore[attr-defined]
    push = getattr(loop._push_messages, "__wrapped__", loop._push_messages)
    loop._push_messages = _answering(push, clock, exchange)  # type: ignore[attr-defined]
    loop.pull_objects = partial(  # type: ignore[attr-defined]
        pull_objects, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S
    )
    return clock


class Exchange:
    """The message the loop took last (``awaiting``: its id, until its reply has gone) and
    the messages whose replies it sent (``answered``)."""

    def __init__(self) -> None:
        self.awaiting: str | None = None
        self.answered: set[str] = set()


def _receiving(pull_and_store: Callable[..., Any], exchange: Exchange) -> Callable[..., Any]:
    """Flower's take-a-message step, noting in ``exchange`` the message it took (none when
    there was none or Flower dropped it)."""

    @wraps(pull_and_store)
    def pulling(**kwargs: Any) -> Any:
        receive = kwargs["receive"]
        taken: list[str] = []

        def receiving() -> Any:
            got = receive()
            if got is not None:
                taken.append(got[0].metadata.message_id)
            return got

        run_id = pull_and_store(**{**kwargs, "receive": receiving})
        exchange.awaiting = taken[0] if run_id is not None and taken else None
        return run_id

    return pulling


def _answering(
    push: Callable[..., None], clock: PollClock, exchange: Exchange
) -> Callable[..., None]:
    """Flower's wait-for-replies-and-send step (run after every message taken), telling
    ``clock`` when it starts and ends, and run again until the reply to the message taken
    has been sent (Flower's sends the replies there are, maybe only stale ones)."""

    @wraps(push)
    def pushing(**kwargs: Any) -> None:
        send = kwargs["send"]

        def sending(message: Any, *args: Any) -> Any:
            exchange.answered.add(message.metadata.reply_to_message_id)
            return send(message, *args)

        clock.handled()
        try:
            while True:
                push(**{**kwargs, "send": sending})
                if exchange.awaiting is None or exchange.awaiting in exchange.answered:
                    break
        finally:
            exchange.awaiting = None
            exchange.answered.clear()
            clock.handled()

    return pushing


def main(argv: list[str] | None = None) -> None:
    """Parse the two poll intervals, shorten the waits, and run ``flower-supernode`` with
    the rest of the arguments."""
    # --help is Flower's: every argument but the two below is flower-supernode's
    parser = argparse.ArgumentParser(prog="python -m fedslm.clients.supernode", add_help=False)
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S)
    parser.add_argument("--idle-poll-interval", type=float, default=DEFAULT_IDLE_POLL_S)
    args, flower_args = parser.parse_known_args(argv)
    for name, value in (("--poll-interval", args.poll_interval),
                        ("--idle-poll-interval", args.idle_poll_interval)):  # fmt: skip
        if not 0.01 <= value <= 60.0:
            parser.error(f"{name} must be between 0.01 and 60 seconds")
    shorten_waits(args.poll_interval, args.idle_poll_interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
