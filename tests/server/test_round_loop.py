"""The ServerApp's rounds (``server/app.py``, ``run_flower_rounds``: the library's round sequence
over Flower messages): one message per site and round, each training message bringing the
previous round's adapter for the site to evaluate.

The grid here is a stand-in for Flower's transport only: it hands each message to the real
site code (``clients/handlers.py`` on ``Site`` objects built as the simulation builds them)
and returns the real replies. The reference is ``fedslm.inprocess.run_job_in_process``, which
trains, aggregates and then evaluates each round in turn, with no messages at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from fedslm.clients.handlers import HANDLERS
from fedslm.server.app import run_flower_rounds
from fedslm.server.strategy import FedSLMStrategy
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedslm.config import validate_config
from fedslm.errors import FederationError
from fedslm.inprocess import build_site, run_job_in_process
from fedslm.job import PreparedJob, make_coordinator, prepare_job
from fedslm.privacy.egress_log import egress_entries
from fedslm.privacy.ledger import PrivacyLedger
from fedslm.progress import Reporter
from fedslm.site import Site

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages need the identity of a running task; Flower sets it when an app runs."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class SiteGrid:
    """Delivers each message to its node's ``Site`` through the site's message handlers, as
    the ClientApp does; ``fail`` makes a node answer the given (round, attempt)s with an
    error. Every push is recorded: (message type, round, evaluate-round) per message."""

    def __init__(
        self,
        sites: dict[int, Site],
        fail: Iterable[tuple[int, int, int]] = (),
        delay: dict[tuple[str, int], float] | None = None,
    ) -> None:
        self.sites = sites
        self.fail = set(fail)  # (node, round, attempt)
        self.delay = delay or {}  # (message type, round) -> seconds a site takes on top
        self.pushes: list[list[tuple[str, int, int | None]]] = []
        self.states = {node: RecordDict() for node in sites}
        self.replies: dict[str, Message] = {}
        self._attempts: dict[tuple[int, int], int] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        batch, ids = [], []
        for m in messages:
            config = m.content["config"]
            r, evaluated = int(config["round"]), config.get("evaluate-round")
            batch.append(
                (m.metadata.message_type, r, None if evaluated is None else int(evaluated))
            )
            m.metadata.__dict__["_message_id"] = msg_id = f"m{len(self.replies)}-{len(self.pushes)}"
            self.replies[msg_id] = self._answer(m)
            ids.append(msg_id)
        self.pushes.append(batch)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _answer(self, m: Message) -> Message:
        node, kind = m.metadata.dst_node_id, m.metadata.message_type
        r = int(m.content["config"]["round"])
        attempt = self._attempts[(node, r)] = self._attempts.get((node, r), 0) + (kind == "train")
        if (node, r, attempt) in self.fail:
            return Message(Error(code=1, reason="site went away"), reply_to=m)
        content = HANDLERS[kind](self.sites[node], m.content, self.states[node], node)
        time.sleep(self.delay.get((kind, r), 0.0))
        return Message(content=content, reply_to=m)


def _prepare(tmp: Path, tiny_bert: Path, name: str, **federation: object) -> PreparedJob:
    raw = {
        "seed": 11,
        "model": {"path": str(tiny_bert)},
        "lora": {"r": 2, "alpha": 4},
        "train": {
            "mode": "lora",
            "local_steps": 2,
            "batch_size": 16,
            "max_length": 16,
            "learning_rate": 0.05,
        },
        "privacy": {"noise_multiplier": 1.0},
        "federation": {"sites": 2, "rounds": 3, **federation},
        "data": {"synthetic": {"rows_per_site": 80}},
    }
    return prepare_job(validate_config(raw), "loop", tmp / name)


def _loop(
    prepared: PreparedJob,
    fail: Iterable[tuple[int, int, int]] = (),
    delay: dict[tuple[str, int], float] | None = None,
) -> SiteGrid:
    sites = {node: build_site(prepared, s) for node, s in enumerate(prepared.sites, start=1)}
    coordinator = make_coordinator(prepared)
    strategy = FedSLMStrategy(coordinator, len(sites), Reporter(quiet=True), job_id="loop")
    grid = SiteGrid(sites, fail, delay)
    config = ConfigRecord({"quiet": True})
    try:
        run_flower_rounds(grid, strategy, coordinator, Reporter(quiet=True), config)  # type: ignore[arg-type]
    finally:
        coordinator.finish()
    return grid


def _metrics(prepared: PreparedJob) -> list[dict]:
    return [json.loads(x) for x in (prepared.out / "metrics.jsonl").read_text().splitlines()]


def test_one_message_per_round_matches_train_then_evaluate(tmp_path: Path, tiny_bert: Path) -> None:
    """Three rounds take three training pushes and one final evaluation, and give the adapter
    and every round's evaluation that training then evaluating each round in turn gives."""
    reference = _prepare(tmp_path, tiny_bert, "reference")
    run_job_in_process(reference)
    joined = _prepare(tmp_path, tiny_bert, "joined")
    grid = _loop(joined)

    assert grid.pushes == [
        [("train", 1, None)] * 2,
        [("train", 2, 1)] * 2,
        [("train", 3, 2)] * 2,
        [("evaluate", 3, None)] * 2,
    ]
    want, got = _metrics(reference), _metrics(joined)
    assert [r["round"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got, strict=True):
        assert b["aggregated"] and not b["failures"]
        assert b["train_loss"] == a["train_loss"]
        assert b["eval_loss"] == a["eval_loss"] and b["eval_accuracy"] == a["eval_accuracy"]
        for site in ("site-1", "site-2"):
            assert b["sites"][site]["eval_loss"] == a["sites"][site]["eval_loss"]
        assert b["wall_seconds"] > 0
    final = torch.load(joined.out / "checkpoints" / "round-3" / "coordinator_state.pt")
    ref = torch.load(reference.out / "checkpoints" / "round-3" / "coordinator_state.pt")
    assert all(torch.equal(final["state"][k], ref["state"][k]) for k in ref["state"])
    # each site released one evaluation per round, of that round (round 3's by itself)
    for site in grid.sites.values():
        with PrivacyLedger(site.ledger_path, create=False) as ledger:
            sent = [(e.round, e.kind) for e in egress_entries(ledger, joined.job_id)]
        assert sent == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate"),
                        (3, "train"), (3, "evaluate")]  # fmt: skip


def test_a_retried_round_asks_for_no_evaluation_again(tmp_path: Path, tiny_bert: Path) -> None:
    """Site 2 fails round 2's first attempt: round 1 is recorded with its evaluation missing,
    and round 2 is sent again, without the evaluation."""
    prepared = _prepare(tmp_path, tiny_bert, "retry", min_sites=2, round_retries=1)
    grid = _loop(prepared, fail=[(2, 2, 1)])
    assert grid.pushes == [
        [("train", 1, None)] * 2,
        [("train", 2, 1)] * 2,
        [("train", 2, None)] * 2,  # the retry
        [("train", 3, 2)] * 2,
        [("evaluate", 3, None)] * 2,
    ]
    rounds = _metrics(prepared)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert set(rounds[0]["sites"]["site-1"]) >= {"eval_loss"}
    assert "eval_loss" not in rounds[0]["sites"]["site-2"]
    assert rounds[0]["failures"] == ["evaluate: node 2: site went away"]
    assert all(r["aggregated"] for r in rounds)


def test_a_run_that_stops_has_recorded_the_round_before(tmp_path: Path, tiny_bert: Path) -> None:
    """Round 3 cannot be aggregated (a site fails, no retries): round 2, whose evaluation came
    back with round 3's replies, is recorded, and then round 3 with its reason."""
    prepared = _prepare(tmp_path, tiny_bert, "stop", min_sites=2, round_retries=0)
    with pytest.raises(FederationError, match="round 3 could not be aggregated"):
        _loop(prepared, fail=[(1, 3, 1)])
    rounds = _metrics(prepared)
    assert [(r["round"], r["aggregated"]) for r in rounds] == [(1, True), (2, True), (3, False)]
    assert rounds[1]["sites"]["site-2"]["eval_loss"] > 0


def test_each_round_is_timed_with_its_own_message(tmp_path: Path, tiny_bert: Path) -> None:
    """A round's wall time runs from the previous round's aggregation to its own, so the time
    sites take on round 2's message is round 2's, although round 1 is recorded only once
    that message is answered; the last round includes the final evaluation, and the rounds
    add up to the run."""
    prepared = _prepare(tmp_path, tiny_bert, "timed", rounds=2)
    delay = {("train", 1): 0.5, ("train", 2): 3.0, ("evaluate", 2): 1.0}
    start = time.perf_counter()
    _loop(prepared, delay=delay)
    elapsed = time.perf_counter() - start
    first, last = (r["wall_seconds"] for r in _metrics(prepared))
    # each of the two sites takes the delay (the grid answers them one after the other)
    assert 2 * 0.5 <= first < 2 * 3.0  # round 2's seconds are not round 1's
    assert last >= 2 * (3.0 + 1.0)
    assert first + last <= elapsed
