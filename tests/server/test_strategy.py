"""The Flower strategy adapter: error replies and malformed replies never reach the average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fedslm.clients.codec import (
    EVAL_PREFIX,
    arrays_to_state,
    decode_update,
    encode_payload,
    join_replies,
    state_to_arrays,
)
from fedslm.server.strategy import FedSLMStrategy, exchange
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator
from fedslm.egress import Payload
from fedslm.privacy.accounting import Segment
from fedslm.progress import Reporter


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages need the identity of a running task; Flower sets it when an app runs."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _strategy(tmp_path: Path, min_sites: int) -> FedSLMStrategy:
    job = JobConfig.model_validate({"federation": {"sites": 3, "min_sites": min_sites}})
    coordinator = Coordinator(job, tmp_path, torch.nn.Module(), {"w": torch.zeros(2)}, {})
    coordinator.start_round(1)
    return FedSLMStrategy(coordinator, 3, Reporter(quiet=True))


def _request(node: int) -> Message:
    content = RecordDict(
        {"arrays": state_to_arrays({"w": torch.zeros(2)}), "config": ConfigRecord({"round": 1})}
    )
    return Message(content=content, dst_node_id=node, message_type="train")


def _ok(node: int, site: str, value: float, head: str = "ab" * 32, seq: int = 0) -> Message:
    """A training reply as ``Site.train_payload`` builds it (``seq`` 0: a site that sends
    its ledger head without the seq)."""
    payload = Payload(
        "train",
        {"w": torch.full((2,), value)},
        {
            "num-examples": 10,
            "train-loss": 1.5,
            "steps": 4,
            "seconds": 0.2,
            "privacy-seconds": 0.01,
        },
        {
            "site": site,
            "dp": True,
            "q": 0.1,
            "sigma": 1.0,
            "dp_steps": 4,
            "epsilon": 0.5,
            "delta": 1e-5,
            "accountant": "prv",
            "max_grad_norm": 1.0,
            "lifetime_epsilon": 0.7,
            "ledger_head": head,
            **({"ledger_seq": seq} if seq else {}),
        },
    )
    return Message(content=encode_payload(payload), reply_to=_request(node))


def test_codec_round_trip() -> None:
    report = decode_update(_ok(1, "site-1", 2.0).content)
    assert report.site == "site-1" and report.num_examples == 10
    assert report.segment == Segment(0.1, 1.0, 4) and report.accountant == "prv"
    assert report.lifetime_epsilon == 0.7 and report.ledger_head == "ab" * 32
    assert report.bytes_sent > 8
    torch.testing.assert_close(report.state["w"], torch.full((2,), 2.0))


def test_error_and_malformed_replies_are_failures(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    error = Message(Error(code=1, reason="site crashed"), reply_to=_request(2))
    malformed = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=_request(3))
    arrays, _ = strategy.aggregate_train(1, [_ok(1, "site-1", 2.0), error, malformed])
    assert arrays is None  # 1 usable update < min_sites 2
    failures = strategy.coordinator.record["failures"]
    assert any("site crashed" in f for f in failures)
    assert any("malformed" in f for f in failures)


def test_refusals_are_recorded_with_their_reasons(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    payload = Payload(
        "refusal", {}, {}, {"site": "site-3", "refused": True, "reasons": ["over budget"]}
    )
    refusal = Message(encode_payload(payload), reply_to=_request(3))
    arrays, _ = strategy.aggregate_train(1, [_ok(1, "site-1", 2.0), _ok(2, "site-2", 4.0), refusal])
    assert arrays is not None
    assert strategy.coordinator.record["refusals"] == {"site-3": ["over budget"]}
    assert strategy.coordinator.privacy["site-3"].refusals == ["round 1: over budget"]


def test_enough_replies_are_averaged(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    error = Message(Error(code=1, reason="site crashed"), reply_to=_request(3))
    arrays, metrics = strategy.aggregate_train(
        1, [_ok(1, "site-1", 2.0), _ok(2, "site-2", 4.0), error]
    )
    assert arrays is not None and metrics is not None
    torch.testing.assert_close(arrays_to_state(arrays)["w"], torch.full((2,), 3.0))


class _Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def test_each_train_message_carries_the_sites_anchored_ledger_head(tmp_path: Path) -> None:
    """The coordinator tells each site the last head it anchored for it (here learned from
    round 1's replies, as in simulation), so the site can check its ledger still extends it."""
    from fedslm.clients.codec import ANCHOR_HASH, ANCHOR_SEQ

    strategy = _strategy(tmp_path, min_sites=1)
    arrays, _ = strategy.aggregate_train(
        1, [_ok(1, "site-1", 2.0, "1" * 64, 4), _ok(2, "site-2", 2.0, "2" * 64, 9)]
    )
    assert arrays is not None
    common = ConfigRecord({"round": 2})
    messages = strategy.configure_train(2, arrays, common, _Nodes())  # type: ignore[arg-type]
    configs = {m.metadata.dst_node_id: m.content["config"] for m in messages}
    assert (configs[1][ANCHOR_SEQ], configs[1][ANCHOR_HASH]) == (4, "1" * 64)
    assert (configs[2][ANCHOR_SEQ], configs[2][ANCHOR_HASH]) == (9, "2" * 64)
    assert ANCHOR_SEQ not in configs[3]  # no head of node 3's site is anchored yet
    assert ANCHOR_SEQ not in common and configs[1]["round"] == 2  # per site, not shared
    evaluate = strategy.configure_evaluate(2, arrays, ConfigRecord({}), _Nodes())  # type: ignore[arg-type]
    assert all(ANCHOR_SEQ not in m.content["config"] for m in evaluate)


def _eval_payload(site: str, loss: float) -> Payload:
    return Payload(
        "evaluate", {}, {"num-examples": 5, "eval-loss": loss, "eval-accuracy": 0.5}, {"site": site}
    )


def test_evaluations_riding_on_training_replies_are_recorded(tmp_path: Path) -> None:
    """Round 2's training replies carry the sites' evaluations of round 1's adapter: each
    part is read on its own; a site that refused training still evaluated."""
    strategy = _strategy(tmp_path, min_sites=1)
    trained = _ok(1, "site-1", 2.0)
    joined = join_replies(
        encode_payload(_eval_payload("site-1", 1.0), EVAL_PREFIX), trained.content
    )
    training_refused = encode_payload(
        Payload("refusal", {}, {}, {"site": "site-2", "refused": True, "reasons": ["budget"]})
    )
    refused_but_evaluated = join_replies(
        encode_payload(_eval_payload("site-2", 3.0), EVAL_PREFIX), training_refused
    )
    whole_message_refused = encode_payload(  # e.g. the site does not run this job at all
        Payload("refusal", {}, {}, {"site": "site-3", "refused": True, "reasons": ["no"]})
    )
    replies = [
        Message(joined, reply_to=_request(1)),
        Message(refused_but_evaluated, reply_to=_request(2)),
        Message(whole_message_refused, reply_to=_request(3)),
    ]
    strategy.aggregate_evaluate(1, replies)
    rec = strategy.coordinator.record
    assert rec["eval_loss"] == pytest.approx(2.0)  # (1.0 * 5 + 3.0 * 5) / 10
    assert rec["sites"]["site-1"]["eval_loss"] == 1.0 and rec["sites"]["site-2"]["eval_loss"] == 3.0
    assert rec["failures"] == ["evaluate: node 3: refused: no"]
    # and the training parts are what aggregate_train sees
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert rec["refusals"] == {"site-2": ["budget"], "site-3": ["no"]}


def test_only_an_evaluation_encoded_with_its_prefix_joins_a_reply() -> None:
    evaluation = encode_payload(_eval_payload("site-1", 1.0))
    with pytest.raises(ValueError, match="EVAL_PREFIX"):
        join_replies(evaluation, _ok(1, "site-1", 2.0).content)


class _OneShotGrid:
    """Pushes record the message ids; each pull returns the replies ``answer`` makes."""

    def __init__(self, answer: object) -> None:
        self.answer, self.sent = answer, []

    def push_messages(self, messages: list[Message]) -> list[str]:
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        self.sent = list(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: object) -> list[Message]:
        replies, self.sent = [self.answer(m) for m in self.sent], []  # type: ignore[operator]
        return replies


def test_an_error_the_superlink_writes_for_a_site_is_in_that_sites_name() -> None:
    def superlink_error(m: Message) -> Message:
        reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = 1  # Flower writes these from node 1
        return reply

    (reply,) = exchange(_OneShotGrid(superlink_error), [_request(42)], timeout=5)  # type: ignore[arg-type]
    assert reply.has_error() and reply.error.reason == "Node Unavailable"
    assert reply.metadata.src_node_id == 42


def test_a_message_nobody_answers_gets_an_error_in_its_sites_name() -> None:
    class Silent(_OneShotGrid):
        def pull_messages(self, ids: object) -> list[Message]:
            return []

    (reply,) = exchange(Silent(None), [_request(7)], timeout=0.05)  # type: ignore[arg-type]
    assert reply.has_error() and "no reply within 0.05 s" in reply.error.reason
    assert reply.metadata.src_node_id == 7
