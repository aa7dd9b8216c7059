"""The Flower strategy adapter: error replies and malformed replies never reach the average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fedslm.clients.codec import arrays_to_state, decode_update, encode_payload, state_to_arrays
from fedslm.server.strategy import FedSLMStrategy
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


def _ok(node: int, site: str, value: float) -> Message:
    """A training reply as ``Site.train_payload`` builds it."""
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
            "ledger_head": "ab" * 32,
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
