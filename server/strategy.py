"""fedslm's strategy in the shape of ``flwr.serverapp.strategy``: four hooks and a summary.

The hooks only translate between Flower messages and ``fedslm.coordinator.Coordinator``,
which decides and records everything. Every site takes part in every round (cross-silo).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from fedslm.wire.codec import (
    EVAL_PREFIX,
    decode_eval,
    decode_protocol_reply,
    decode_refusal,
    decode_secure_update,
    decode_update,
    message_to_config,
    state_to_arrays,
)
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslm.coordinator import Coordinator, SecureDropout
from fedslm.errors import FederationError
from fedslm.messages import ROUND, SiteReport, StageInstruction, TrainInstruction, anchor_config
from fedslm.progress import Reporter
from fedslm.secagg.adapter import job_params, session_id, vector_size
from fedslm.secagg.driver import Exchange, NoReply, run_secagg_stages
from fedslm.secagg.messages import KeyAdvert

# a decoded training reply: a plain update, or (node, (update, key advert)) under secure aggregation
Update = TypeVar("Update", SiteReport, tuple[int, tuple[SiteReport, KeyAdvert]])

# How often replies are polled for. Flower's send_and_receive waits 3 s between polls, which
# adds 1.5 s on average to every message of a deployed round; a poll is one small request to
# the SuperLink on the coordinator itself.
POLL_INTERVAL_S = 0.1
# Retry a reply's array that the SuperLink does not have yet after 20 ms (doubling to 0.5 s)
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.02, 0.5


def quicker_reply_pulls() -> None:
    """Make the deployed ServerApp's grid retry a reply's missing arrays sooner.

    The SuperLink lists a reply as soon as a SuperNode has sent it, before its arrays have
    all arrived; Flower's grid then waits 1 s (doubling up to 10 s) before asking again,
    which cost up to 1.4 s on a third of a deployed round's messages (docs/benchmarks.md,
    section 11). Flower has no setting for it, so the grid module's ``pull_objects`` is bound
    to shorter waits, in this process only.
    """
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.superlink.grid import http_grid

    http_grid.pull_objects = partial(
        pull_objects, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S
    )


@dataclass(frozen=True)
class Sent:
    """Messages pushed to the sites (in order, with the ids the SuperLink gave them), and
    when (``time.perf_counter``); their replies are collected with ``collect``."""

    messages: list[Message]
    ids: list[str]
    at: float


def send(grid: Grid, messages: Iterable[Message]) -> Sent:
    """Push ``messages`` to the sites in one call."""
    sent = list(messages)
    at = time.perf_counter()
    return Sent(sent, list(grid.push_messages(sent)), at)


def collect(grid: Grid, sent: Sent, timeout: float) -> list[Message]:
    """The replies to ``sent``, polled for until all have arrived or ``timeout`` seconds
    after they were sent (``Grid.send_and_receive``'s wait with a shorter polling interval).
    A message still unanswered then gets an error reply in its site's name, so the round's
    record says which site did not answer; so does an error the SuperLink wrote for a site
    (e.g. "Node Unavailable", which Flower sends from the SuperLink's own node id)."""
    pending = set(sent.ids)
    asked = dict(zip(sent.ids, sent.messages, strict=True))
    replies: list[Message] = []
    deadline = sent.at + timeout
    while pending:
        for reply in grid.pull_messages(pending):
            original = asked.get(reply.metadata.reply_to_message_id)
            if (
                reply.has_error()
                and original is not None
                and reply.metadata.src_node_id != original.metadata.dst_node_id
            ):
                reply = Message(reply.error, reply_to=original)
            replies.append(reply)
            pending.discard(reply.metadata.reply_to_message_id)
        if not pending or time.perf_counter() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    for msg_id, msg in asked.items():
        if msg_id in pending:
            reason = f"no reply within {timeout:g} s (federation.round_timeout_s)"
            replies.append(Message(Error(code=0, reason=reason), reply_to=msg))
    return replies


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and collect their replies (``send`` then ``collect``)."""
    return collect(grid, send(grid, messages), timeout)


class FedSLMStrategy(Strategy):
    """fedslm's Flower strategy: the four hooks of ``flwr.serverapp.strategy.Strategy``, each
    a translation between Flower messages and the ``Coordinator``, which decides and records.

    - ``configure_train``: a train message to every site with the global adapter (and the
      earlier round to evaluate first, and the site's anchored ledger head);
    - ``aggregate_train``: the replies decoded and sorted into updates, failures and refusals,
      then handed to the coordinator, which screens the updates and combines them by the job's
      aggregation rule (``federation.aggregation``, one of ``fedslm.aggregation_rules``; or
      ``federation.robust``'s median or trimmed mean; or, under central DP, a clipped and
      noised mean) and moves the global adapter through its server optimizer. Under secure
      aggregation the protocol's later stages run here, and the coordinator gets only the sum;
    - ``configure_evaluate`` / ``aggregate_evaluate``: the sites' evaluations of the global
      adapter, folded into the round's record.

    The rounds are not driven by ``Strategy.start`` but by the library's one round sequence
    (``fedslm.rounds.run_round_sequence`` over ``fedslm.server.app.FlowerTransport``).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        num_sites: int,
        reporter: Reporter,
        connect_timeout_s: float = 300.0,
        job_id: str = "",
        roster: Mapping[int, str] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.num_sites = num_sites
        self.reporter = reporter
        self.connect_timeout_s = connect_timeout_s
        self.job_id = job_id
        # deployment: Flower node id -> the site name registered with that node's key. Only
        # these nodes are asked, and a reply must speak for the site its key belongs to.
        self.roster = dict(roster) if roster is not None else None
        # simulation (no roster): the site each node spoke for, learned from its replies
        self._seen: dict[int, str] = {}
        self._waited = False
        # secure aggregation runs its later stages from aggregate_train; Flower's loop hands
        # the grid and config to configure_train only, so they are kept from there
        self._grid: Grid | None = None
        self._config: ConfigRecord | None = None

    def summary(self) -> None:
        """Describe the strategy in the log."""
        job = self.coordinator.job
        secure = ""
        if job.federation.secure_aggregation:
            ring = job_params(job, b"summary", self.num_sites).ring_bits
            secure = f", secure aggregation ({ring}-bit ring)"
        self.reporter.info(
            f"strategy: {job.federation.aggregation} over {self.num_sites} sites, "
            f"{job.federation.rounds} rounds, min_sites {job.federation.required_sites}{secure}"
        )

    def _nodes(self, grid: Grid) -> list[int]:
        """The nodes to ask this round. Before the first round, wait up to
        ``connect_timeout_s`` for every site; afterwards take the sites connected now (a
        site that went away is not waited for), as long as ``min_sites`` of them are."""
        wanted = set(self.roster) if self.roster is not None else None
        expected = len(wanted) if wanted is not None else self.num_sites
        needed = self.coordinator.job.federation.required_sites
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            nodes = sorted(n for n in grid.get_node_ids() if wanted is None or n in wanted)
            if len(nodes) >= expected or (self._waited and len(nodes) >= needed):
                self._waited = True
                return nodes
            if time.monotonic() > deadline:
                if len(nodes) >= needed:
                    self._waited = True
                    self.reporter.warn(
                        f"starting with {len(nodes)} of {expected} sites; not connected: "
                        + ", ".join(self._missing(nodes))
                    )
                    return nodes
                raise FederationError(
                    f"only {len(nodes)} of {expected} sites connected within "
                    f"{self.connect_timeout_s:.0f} s (federation.min_sites is {needed})"
                    + (f"; not connected: {', '.join(self._missing(nodes))}" if wanted else "")
                )
            time.sleep(1.0)

    def _missing(self, nodes: list[int]) -> list[str]:
        if self.roster is None:
            return []
        return sorted(name for node, name in self.roster.items() if node not in nodes)

    def _label(self, node: int) -> str:
        """How a node is named in the round's record: its site, when the roster knows it."""
        if self.roster is not None and node in self.roster:
            return f"site {self.roster[node]} (node {node})"
        return f"node {node}"

    def _identity(self, node: int, claimed: str) -> str | None:
        """Why a reply from ``node`` claiming to be site ``claimed`` is not accepted (None:
        it is). Without a roster (simulation) every node speaks for itself."""
        if self.roster is None:
            self._seen[node] = claimed
            return None
        registered = self.roster.get(node)
        if registered is None:
            return f"node {node} is not on this run's roster"
        if registered != claimed:
            return f"node {node} is registered as site {registered!r} but replied as {claimed!r}"
        return None

    def _messages(
        self, kind: str, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = []
        for node in self._nodes(grid):
            node_config = self._train_config(config, node) if kind == MessageType.TRAIN else config
            content = RecordDict({"arrays": arrays, "config": node_config})
            messages.append(Message(content=content, message_type=kind, dst_node_id=node))
        return messages

    def _train_config(self, config: ConfigRecord, node: int) -> ConfigRecord:
        """``config`` with the ledger head the coordinator anchored for the node's site, when
        it knows the site and holds one: the site refuses to train on a ledger that does not
        extend it (a rewrite padded past the anchored seq shows no conflict in its head)."""
        site = self.roster.get(node) if self.roster is not None else self._seen.get(node)
        extra = anchor_config(self.coordinator.site_anchor(site)) if site else {}
        return ConfigRecord({**config, **extra}) if extra else config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every site trains on the current global adapter (and, when ``config`` has
        ``evaluate-round``, first evaluates it: ``aggregate_evaluate`` takes those replies).
        Each site's message also carries its last anchored ledger head (``_train_config``).
        The round loop starts the coordinator's round (``Coordinator.start_round``) once the
        previous round is recorded, which with an evaluation riding along is after the
        replies to these messages."""
        config[ROUND.name] = server_round
        self._grid, self._config = grid, config
        return self._messages(MessageType.TRAIN, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies and hand them to the coordinator, which screens the updates and
        combines them (``Coordinator.aggregate``, ``aggregate_secure``)."""
        if self.coordinator.job.federation.secure_aggregation:
            return self._aggregate_secure(server_round, replies)
        reports, failures, refusals = _sort_replies(
            replies, _decode_plain, self._identity, self._label
        )
        state = self.coordinator.aggregate(server_round, reports, failures, refusals)
        return self._train_result(state)

    def _train_result(self, state: dict | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global adapter and the round's training loss, for Flower's loop."""
        if state is None:
            return None, None
        loss = self.coordinator.round_in_hand().train_loss
        return state_to_arrays(state), MetricRecord(
            {"train-loss": loss if loss is not None else -1.0}
        )

    def _aggregate_secure(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Secure aggregation: the training replies carry metrics and key adverts; the later
        stages run here, each sent to the sites that completed the one before. A site that
        trained and then left the protocol is one ``SecureDropout`` (listed once)."""
        decoded, failures, refusals = _sort_replies(
            replies, _decode_secure, self._identity, self._label
        )
        reports, adverts, names = [], [], {}
        dropouts: list[SecureDropout] = []
        for node, (report, advert) in decoded:
            reports.append(report)
            if advert.site_id != node:  # a site speaks for itself only
                reason = f"key advert for another site id {advert.site_id} (node {node})"
                dropouts.append(SecureDropout(report.site, "advertise-keys", reason))
                continue
            adverts.append(advert)
            names[node] = report.site
        survivors: list[str] = []
        job = self.coordinator.job
        params = job_params(job, session_id(self.job_id, server_round), self.num_sites)
        length = vector_size(self.coordinator.state) + 1
        grid, config = self._grid, self._config
        assert grid is not None and config is not None
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        outcome = run_secagg_stages(params, adverts, self._exchange(grid, config, seconds), length)
        seconds["protocol"] = time.perf_counter() - start
        dropouts += [
            SecureDropout(names.get(d.site_id, f"node {d.site_id}"), d.stage, d.reason)
            for d in outcome.dropouts
        ]
        if outcome.result is not None:
            survivors = [names[i] for i in outcome.result.survivors]
        state = self.coordinator.aggregate_secure(
            server_round,
            reports,
            failures,
            refusals,
            outcome.result,
            survivors,
            None if outcome.failure is None else f"secure aggregation failed: {outcome.failure}",
            dropouts,
            seconds,
        )
        return self._train_result(state)

    def _exchange(self, grid: Grid, config: ConfigRecord, seconds: dict[str, float]) -> Exchange:
        """The transport of ``run_secagg_stages``: one QUERY per site and stage, its wall time
        noted in ``seconds``. An error reply (or a timeout: no reply at all), a refusal by the
        site's egress guard or an undecodable reply is answered as ``NoReply`` with its reason;
        ``run_secagg_stages`` records it as the site's dropout."""
        timeout = self.coordinator.job.federation.round_timeout_s

        def stage_exchange(stage: str, requests: Mapping[int, object]) -> dict[int, object]:
            start = time.perf_counter()
            try:
                return ask(stage, requests)
            finally:
                seconds[stage] = time.perf_counter() - start

        def ask(stage: str, requests: Mapping[int, object]) -> dict[int, object]:
            # the round's training config, less the evaluation that rode on its messages
            evaluated = TrainInstruction.EVALUATE_ROUND.name
            common = {k: v for k, v in config.items() if k != evaluated}
            stage_config = ConfigRecord({**common, StageInstruction.STAGE.name: stage})
            messages = [
                Message(
                    content=RecordDict(
                        {"config": stage_config, "secagg": message_to_config(request)}
                    ),
                    message_type=MessageType.QUERY,
                    dst_node_id=node,
                )
                for node, request in requests.items()
            ]
            answers: dict[int, object] = {}
            for reply in exchange(grid, messages, timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    answers[node] = NoReply(f"error reply: {error_reason(reply)}")
                    continue
                refusal = decode_refusal(reply.content)
                if refusal is not None:
                    answers[node] = NoReply(f"refused: {'; '.join(refusal.reasons)}")
                    continue
                try:
                    answers[node] = decode_protocol_reply(stage, reply.content)
                except (KeyError, TypeError, ValueError) as exc:
                    answers[node] = NoReply(f"malformed reply ({exc!r})")
            return answers

        return stage_exchange

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every site evaluates the current global adapter on its held-out split."""
        config[ROUND.name] = server_round
        return self._messages(MessageType.EVALUATE, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Fold evaluations into the round's record (weighted by held-out examples): the
        replies to evaluate messages, or to train messages that carried an evaluation."""
        evals, failures = [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures.append(f"{self._label(node)}: {error_reason(reply)}")
                continue
            prefix = EVAL_PREFIX if reply.metadata.message_type == MessageType.TRAIN else ""
            try:
                if prefix and prefix + "site" not in reply.content:
                    refusal = decode_refusal(reply.content)  # the whole message was refused
                else:
                    refusal = decode_refusal(reply.content, prefix)
                if refusal is not None:
                    failures.append(f"{self._label(node)}: refused: {'; '.join(refusal.reasons)}")
                    continue
                ev = decode_eval(reply.content, prefix)
            except (KeyError, TypeError, ValueError) as exc:
                failures.append(f"{self._label(node)}: malformed ({exc!r})")
                continue
            wrong = self._identity(reply.metadata.src_node_id, ev.site)
            if wrong is not None:
                failures.append(wrong)
                continue
            evals.append(ev)
        metrics = self.coordinator.record_evaluation(evals, failures)
        return MetricRecord({**metrics}) if metrics else None


# Flower's simulation wraps what a ClientApp raised into a Ray task error: its text is a
# remote traceback ending in "... occurred. Message: " and the exception's own message
_CLIENT_APP_MESSAGE = "occurred. Message: "


def error_reason(reply: Message) -> str:
    """The reason of an error reply, without the traceback Flower's simulation wraps around
    an exception the ClientApp raised (its message names the site and what went wrong)."""
    reason = reply.error.reason or ""
    if _CLIENT_APP_MESSAGE in reason:
        reason = reason.rsplit(_CLIENT_APP_MESSAGE, 1)[1].strip().removesuffix("'>").strip()
    return reason


def _decode_plain(content: RecordDict, _node: int) -> SiteReport:
    return decode_update(content)


def _decode_secure(content: RecordDict, node: int) -> tuple[int, tuple[SiteReport, KeyAdvert]]:
    return node, decode_secure_update(content)


def _sort_replies(
    replies: Iterable[Message],
    decode: Callable[[RecordDict, int], Update],
    identity: Callable[[int, str], str | None],
    label: Callable[[int], str] = lambda node: f"node {node}",
) -> tuple[list[Update], list[str], dict[str, list[str]]]:
    """Training replies sorted into decoded updates, failures (error, malformed, or speaking
    for another site than the node's key) and policy refusals. ``decode`` takes the content
    and the sender's node id; ``identity`` says why a node may not speak for a site."""
    decoded: list[Update] = []
    failures: list[str] = []
    refusals: dict[str, list[str]] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures.append(f"{label(node)}: {error_reason(reply)}")
            continue
        try:
            refusal = decode_refusal(reply.content)
            if refusal is not None:
                wrong = identity(node, refusal.site)
                if wrong is not None:
                    failures.append(wrong)
                else:
                    refusals[refusal.site] = refusal.reasons
                continue
            item = decode(reply.content, node)
        except (KeyError, TypeError, ValueError) as exc:
            failures.append(f"{label(node)}: malformed reply ({exc!r})")
            continue
        wrong = identity(node, _site_of(item))
        if wrong is not None:
            failures.append(wrong)
            continue
        decoded.append(item)
    return decoded, failures, refusals


def _site_of(item: SiteReport | tuple[int, tuple[SiteReport, KeyAdvert]]) -> str:
    # a plain update is a SiteReport; a secure one is (node, (SiteReport, KeyAdvert))
    if isinstance(item, SiteReport):
        return item.site
    return item[1][0].site
