"""The strategy's secure-aggregation loop over a fake grid: real protocol logic at the sites,
Flower messages and codec in between, a site failing at a chosen stage."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from fedslm.server.strategy import FedSLMStrategy
from fedslm.wire.codec import config_to_message, encode_payload
from flwr.app import ConfigRecord, Error, Message

from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator
from fedslm.egress import Payload
from fedslm.progress import Reporter
from fedslm.secagg import KeyRoster, SecAggSite, ShareInbox, UnmaskRequest
from fedslm.secagg.adapter import job_params, session_id
from fedslm.secagg.driver import site_stage
from fedslm.site import Site

NODES = {11: "site-1", 2**63 + 7: "site-2", 2**64 - 3: "site-3"}  # uint64 node ids
GLOBAL = {"w": torch.zeros(3)}
UPDATES = {11: np.array([0.1, 0.2, 0.3]), 2**63 + 7: np.array([0.3, 0.0, -0.3]),
           2**64 - 3: np.array([-0.2, 0.4, 0.0])}  # fmt: skip
WEIGHTS = {11: 10, 2**63 + 7: 30, 2**64 - 3: 20}
BLOCKED = "egress guard blocked the secagg-masked reply: 32 bytes of vectors"
_REQUESTS = {"share-keys": KeyRoster, "masked-input": ShareInbox, "unmask": UnmaskRequest}
_PAYLOADS = {
    "share-keys": Site.shares_payload,
    "masked-input": Site.masked_payload,
    "unmask": Site.unmask_payload,
}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages need the identity of a running task; Flower sets it when an app runs."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """Answers QUERY messages as the ClientApp would (protocol state per node), except that
    ``fail`` nodes answer a chosen stage with an error and ``refuse`` nodes with a refusal."""

    def __init__(
        self, job: JobConfig, fail: dict[str, int], refuse: dict[str, int] | None = None
    ) -> None:
        self.params = job_params(job, session_id("job", 1), 3)
        self.fail = fail
        self.refuse = refuse or {}
        self.states: dict[int, dict] = {}
        self.replies: dict[str, Message] = {}
        self.masked: list[np.ndarray] = []  # the masked vectors as they travelled

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def train_reply(self, node: int, request: Message) -> Message:
        site = SecAggSite(self.params, node)
        advert = site.advertise()
        self.states[node] = site.to_state()
        fields = {"site": NODES[node], "dp": False, "secagg_site_id": node,
                  "cipher_pk": advert.cipher_pk, "mask_pk": advert.mask_pk}  # fmt: skip
        metrics = {"num-examples": WEIGHTS[node], "train-loss": 1.0, "steps": 2, "seconds": 0.1}
        payload = Payload("train-secure", {}, metrics, fields)
        return Message(content=encode_payload(payload), reply_to=request)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            # as Flower's grid does: a pushed message gets its id, which its reply refers to
            m.metadata.__dict__["_message_id"] = msg_id = f"m{len(self.replies)}"
            self.replies[msg_id] = self._answer(m)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _answer(self, m: Message) -> Message:
        node, stage = m.metadata.dst_node_id, str(m.content["config"]["stage"])
        # a site's worker refuses an evaluation request in anything but a train message
        assert "evaluate-round" not in m.content["config"]
        if self.fail.get(stage) == node:
            return Message(Error(code=1, reason="site went away"), reply_to=m)
        if self.refuse.get(stage) == node:
            refusal = Payload(
                "refusal", fields={"site": NODES[node], "refused": True, "reasons": [BLOCKED]}
            )
            return Message(content=encode_payload(refusal), reply_to=m)
        request = config_to_message(_REQUESTS[stage], m.content["secagg"])
        reply, self.states[node] = site_stage(
            self.params, self.states[node], stage, request, UPDATES[node], WEIGHTS[node]
        )
        payload = _PAYLOADS[stage](reply)  # type: ignore[operator]
        self.masked += payload.vectors.values()
        return Message(content=encode_payload(payload), reply_to=m)


def _run(
    tmp_path: Path,
    fail: dict[str, int],
    threshold: int = 2,
    refuse: dict[str, int] | None = None,
    secagg: dict | None = None,
) -> FedSLMStrategy:
    job = JobConfig.model_validate(
        {
            "federation": {
                "sites": 3,
                "min_sites": 2,
                "secure_aggregation": True,
                "secagg": {"threshold": threshold, **(secagg or {})},
            }
        }
    )
    coordinator = Coordinator(job, tmp_path, torch.nn.Module(), dict(GLOBAL), {})
    strategy = FedSLMStrategy(coordinator, 3, Reporter(quiet=True), job_id="job")
    strategy.grid = grid = FakeGrid(job, fail, refuse)  # type: ignore[attr-defined]
    arrays = ConfigRecord()  # unused by the fake grid
    config = ConfigRecord({"round": 1, "evaluate-round": 0})  # as round 1 were not the first
    requests = list(strategy.configure_train(1, arrays, config, grid))  # type: ignore[arg-type]
    replies = [grid.train_reply(m.metadata.dst_node_id, m) for m in requests]
    coordinator.start_round(1)  # the round loop's part
    strategy.aggregate_train(1, replies)
    return strategy


def test_all_sites_secure_mean_equals_the_weighted_mean(tmp_path: Path) -> None:
    s = _run(tmp_path, {})
    rec = s.coordinator.record
    assert rec.aggregated, rec
    seconds = rec.secure_aggregation["seconds"]  # each exchange and the whole protocol
    assert set(seconds) == {"share-keys", "masked-input", "unmask", "protocol"}
    exchanges = seconds["share-keys"] + seconds["masked-input"] + seconds["unmask"]
    assert 0 < exchanges <= seconds["protocol"]
    mean = sum(WEIGHTS[n] * UPDATES[n] for n in NODES) / sum(WEIGHTS.values())
    torch.testing.assert_close(
        s.coordinator.state["w"], torch.tensor(mean, dtype=torch.float32), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("stage", ["share-keys", "masked-input", "unmask"])
def test_a_site_failing_at_a_stage_is_a_dropout(tmp_path: Path, stage: str) -> None:
    gone = 2**63 + 7
    s = _run(tmp_path, {stage: gone})
    rec = s.coordinator.record
    assert rec.aggregated, rec
    # listed once, by site name, with the stage and the transport's reason
    assert rec.failures == [
        f"site-2 dropped out of secure aggregation at stage {stage!r}: error reply: site went away"
    ]
    assert rec.secure_aggregation["dropouts"] == [
        {"site": "site-2", "stage": stage, "reason": "error reply: site went away"}
    ]
    kept = [n for n in NODES if n != gone or stage == "unmask"]
    assert rec.secure_aggregation["survivors"] == sorted(NODES[n] for n in kept)
    mean = sum(WEIGHTS[n] * UPDATES[n] for n in kept) / sum(WEIGHTS[n] for n in kept)
    torch.testing.assert_close(
        s.coordinator.state["w"], torch.tensor(mean, dtype=torch.float32), atol=1e-6, rtol=0
    )


def test_below_the_threshold_the_round_is_recorded_not_aggregated(tmp_path: Path) -> None:
    s = _run(tmp_path, {"masked-input": 11}, threshold=3)
    rec = s.coordinator.record
    assert rec.aggregated is False
    assert rec.reason.startswith("secure aggregation failed") and "threshold is 3" in rec.reason
    assert rec.secure_aggregation["survivors"] == []
    assert [d["site"] for d in rec.secure_aggregation["dropouts"]] == ["site-1"]
    assert set(rec.secure_aggregation["seconds"]) == {"share-keys", "masked-input", "protocol"}
    torch.testing.assert_close(s.coordinator.state["w"], GLOBAL["w"])


def test_a_site_refusing_a_stage_is_a_dropout_with_its_reasons(tmp_path: Path) -> None:
    gone = 11
    s = _run(tmp_path, {}, refuse={"masked-input": gone})
    rec = s.coordinator.record
    assert rec.aggregated, rec
    assert rec.secure_aggregation["survivors"] == ["site-2", "site-3"]
    assert rec.secure_aggregation["dropouts"] == [
        {"site": "site-1", "stage": "masked-input", "reason": f"refused: {BLOCKED}"}
    ]
    assert rec.failures == [
        f"site-1 dropped out of secure aggregation at stage 'masked-input': refused: {BLOCKED}"
    ]
    assert rec.refusals == {}  # it trained: a dropout, not a refusal of the round
    kept = [n for n in NODES if n != gone]
    mean = sum(WEIGHTS[n] * UPDATES[n] for n in kept) / sum(WEIGHTS[n] for n in kept)
    torch.testing.assert_close(
        s.coordinator.state["w"], torch.tensor(mean, dtype=torch.float32), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("secagg", "dtype"), [({}, "<u8"), ({"bits": 16, "max_weight": 64}, "<u4")]
)
def test_a_bounded_weight_fits_a_32_bit_ring_and_the_mean_stays_within_the_bound(
    tmp_path: Path, secagg: dict, dtype: str
) -> None:
    # 3 sites x weight <= 64 x (2**15 - 1) < 2**31: the masked vectors halve to 4 bytes
    s = _run(tmp_path, {}, secagg=secagg)
    rec = s.coordinator.record
    assert rec.aggregated, rec
    masked = s.grid.masked  # type: ignore[attr-defined]
    assert len(masked) == 3 and {v.dtype.str for v in masked} == {dtype}
    mean = sum(WEIGHTS[n] * UPDATES[n] for n in NODES) / sum(WEIGHTS.values())
    bound = rec.secure_aggregation["sum_error_bound"] / rec.secure_aggregation["total_weight"]
    step = s.grid.params.clip_range / (2 ** (s.grid.params.bits - 1) - 1)  # type: ignore[attr-defined]
    assert step / 2 <= bound < step  # the grid is what the job asked for
    err = (s.coordinator.state["w"].double() - torch.tensor(mean)).abs().max().item()
    assert err <= bound + 1e-7, (err, bound)  # + float32 rounding of global + mean
