"""The Flower strategy adapter: error replies and malformed replies never reach the average."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fedslm.server.app import deployed_config
from fedslm.server.strategy import FedSLMStrategy, exchange
from fedslm.wire.codec import (
    EVAL_PREFIX,
    arrays_to_state,
    decode_eval,
    decode_refusal,
    decode_update,
    encode_payload,
    join_replies,
    state_to_arrays,
)
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedslm.config import JobConfig, validate_config
from fedslm.coordinator import Coordinator
from fedslm.egress import Payload
from fedslm.job import prepare_job
from fedslm.messages import (
    QUIET,
    DeployedJob,
    EvalInstruction,
    Refusal,
    SiteEval,
    SiteReport,
    StageInstruction,
    TrainInstruction,
)
from fedslm.privacy.accounting import Segment
from fedslm.privacy.anchors import Anchor
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
    failures = strategy.coordinator.record.failures
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
    assert strategy.coordinator.record.refusals == {"site-3": ["over budget"]}
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
    from fedslm.messages import ANCHOR_HASH, ANCHOR_SEQ

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
    assert rec.eval_loss == pytest.approx(2.0)  # (1.0 * 5 + 3.0 * 5) / 10
    assert rec.sites["site-1"].eval_loss == 1.0 and rec.sites["site-2"].eval_loss == 3.0
    assert rec.failures == ["evaluate: node 3: refused: no"]
    # and the training parts are what aggregate_train sees
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert rec.refusals == {"site-2": ["budget"], "site-3": ["no"]}


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


# -- the typed messages through the codec (fedslm.messages, fedslm.wire.codec) -------------------


def _report(dp: bool) -> SiteReport:
    return SiteReport(
        "site-1",
        {"w": torch.full((2,), 0.5)},
        12,
        0.75,
        3,
        1.25,
        0,
        Segment(0.2, 1.1, 3) if dp else None,
        2.5 if dp else None,
        1e-5 if dp else None,
        "prv" if dp else None,
        0.9 if dp else None,
        3.5 if dp else None,
        "cd" * 32 if dp else None,
        0.05,
        7 if dp else None,
    )


def _sent(reply: SiteReport | SiteEval | Refusal, kind: str, prefix: str = "") -> RecordDict:
    metrics, fields = reply.wire_values()
    tensors = dict(reply.state) if isinstance(reply, SiteReport) else {}
    return encode_payload(Payload(kind, tensors, metrics, fields), prefix)


@pytest.mark.parametrize("dp", [True, False])
def test_a_training_reply_round_trips_through_the_codec(dp: bool) -> None:
    sent = _report(dp)
    content = _sent(sent, "train")
    # the wire format of earlier releases: these records, these keys
    assert sorted(content) == ["arrays", "metrics", "site"]
    assert list(content["metrics"]) == [
        "num-examples", "train-loss", "steps", "seconds", "privacy-seconds"
    ]  # fmt: skip
    dp_keys = ["q", "sigma", "dp_steps", "epsilon", "delta", "accountant", "max_grad_norm",
               "lifetime_epsilon", "ledger_head", "ledger_seq"]  # fmt: skip
    assert list(content["site"]) == ["site", "dp", *(dp_keys if dp else [])]
    got = decode_update(content)
    assert got.bytes_sent > 8
    torch.testing.assert_close(got.state["w"], sent.state["w"])
    assert replace(got, state=sent.state, bytes_sent=0) == sent


def test_a_training_reply_without_a_loss_sends_minus_one() -> None:
    sent = replace(_report(True), train_loss=math.nan, lifetime_epsilon=math.inf)
    content = _sent(sent, "train")
    assert content["metrics"]["train-loss"] == -1.0
    assert content["site"]["lifetime_epsilon"] == -1.0
    assert math.isnan(decode_update(content).train_loss)


@pytest.mark.parametrize("prefix", ["", EVAL_PREFIX])
def test_evaluations_and_refusals_round_trip_through_the_codec(prefix: str) -> None:
    evaluation = SiteEval("site-2", 0.5, 0.875, 40)
    assert decode_eval(_sent(evaluation, "evaluate", prefix), prefix) == evaluation
    withheld = SiteEval.withheld_by("site-2", "too few records")
    content = _sent(withheld, "evaluate", prefix)
    assert prefix + "metrics" not in content  # no numbers leave
    back = decode_eval(content, prefix)
    assert (back.site, back.num_examples, back.withheld) == ("site-2", 0, "too few records")
    assert math.isnan(back.loss) and math.isnan(back.accuracy)
    refusal = Refusal("site-3", ["over budget", "wrong model"])
    assert decode_refusal(_sent(refusal, "refusal", prefix), prefix) == refusal
    assert decode_refusal(_sent(evaluation, "evaluate", prefix), prefix) is None


def test_instructions_round_trip_through_a_config_record() -> None:
    anchor = Anchor(4, "1" * 64, "the coordinator's train message for round 3")
    for order in (
        TrainInstruction(3, True, 2, anchor),
        TrainInstruction(1),
    ):
        config = ConfigRecord(order.to_config())
        assert set(config) <= set(TrainInstruction.CONFIG)
        assert TrainInstruction.from_config(config) == order
    evaluate = EvalInstruction(5, True)
    assert EvalInstruction.from_config(ConfigRecord(evaluate.to_config())) == evaluate
    stage = StageInstruction(2, "unmask", False)
    config = ConfigRecord(stage.to_config())
    assert set(config) == set(StageInstruction.CONFIG)
    assert StageInstruction.from_config(config) == stage


def test_the_worker_reads_the_job_config_a_deployed_coordinator_sends(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """``deployed_config`` (the coordinator) and the site worker name the job's keys once:
    ``DeployedJob``; a config without one, or with one that is not a string, is refused
    naming it."""
    raw = {
        "model": {"path": str(tiny_bert)},
        "federation": {"sites": 2, "rounds": 1},
        "data": {"synthetic": {"rows_per_site": 20}},
    }
    prepared = prepare_job(validate_config(raw), "test", tmp_path / "run")
    config = deployed_config(prepared)
    wire = ["job", "job-id", "model-sha256", "fedslm-version", "flwr-version", QUIET.name]
    assert list(config) == wire  # the keys a site of an earlier release reads
    job = DeployedJob.from_config(config)
    assert (job.job_id, job.model_sha256) == (prepared.job_id, prepared.model.sha256)
    assert JobConfig.model_validate_json(job.job) == prepared.job
    assert DeployedJob.from_config(ConfigRecord(job.to_config())) == job
    without = {k: v for k, v in config.items() if k != "job-id"}
    with pytest.raises(ValueError, match=r"lacks \['job-id'\] \(a deployed job sends them\)"):
        DeployedJob.from_config(without)
    with pytest.raises(ValueError, match=r"config \['flwr-version'\] must be strings"):
        DeployedJob.from_config({**config, "flwr-version": 1})


def _tampered(content: RecordDict, record: str, drop: str = "", **extra: object) -> RecordDict:
    old = content[record]
    values = {k: v for k, v in old.items() if k != drop} | extra
    kind = MetricRecord if isinstance(old, MetricRecord) else ConfigRecord
    return RecordDict({**dict(content.items()), record: kind(values)})


@pytest.mark.parametrize(
    ("record", "drop", "extra", "named"),
    [
        ("metrics", "", {"gradient-norm": 1.0}, "metric 'gradient-norm' is not part"),
        ("metrics", "steps", {}, "metric 'steps' is missing"),
        ("site", "", {"hostname": "ward-3"}, "field 'hostname' is not part"),
        ("site", "site", {}, "field 'site' is missing"),
        ("site", "sigma", {}, "field 'sigma' is missing"),
    ],
)
def test_a_training_reply_with_an_unknown_or_missing_key_is_refused(
    record: str, drop: str, extra: dict, named: str
) -> None:
    content = _tampered(_sent(_report(True), "train"), record, drop, **extra)
    with pytest.raises(ValueError, match=named):
        decode_update(content)
    with pytest.raises(ValueError, match="no record 'metrics'"):
        decode_update(RecordDict({k: v for k, v in content.items() if k != "metrics"}))


def test_evaluations_and_refusals_with_unknown_or_missing_keys_are_refused() -> None:
    evaluation = _sent(SiteEval("site-2", 0.5, 0.875, 40), "evaluate")
    with pytest.raises(ValueError, match="metric 'eval-accuracy' is missing"):
        decode_eval(_tampered(evaluation, "metrics", "eval-accuracy"))
    with pytest.raises(ValueError, match="field 'note' is not part"):
        decode_eval(_tampered(evaluation, "site", note="x"))
    refusal = _sent(Refusal("site-3", ["no"]), "refusal")
    with pytest.raises(ValueError, match="field 'reasons' is missing"):
        decode_refusal(_tampered(refusal, "site", "reasons"))


def test_a_reply_with_an_unknown_field_is_a_failure_naming_it(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=1)
    content = _tampered(_ok(2, "site-2", 4.0).content, "site", hostname="ward-3")
    odd = Message(content, reply_to=_request(2))
    arrays, _ = strategy.aggregate_train(1, [_ok(1, "site-1", 2.0), odd])
    assert arrays is not None
    (failure,) = strategy.coordinator.record.failures
    assert "malformed" in failure and "'hostname'" in failure, failure


def test_secure_aggregation_replies_round_trip_through_the_codec() -> None:
    """The key advert and the three protocol replies, with a Flower node id above 2^63 (sent
    as its sint64 form), are decoded into the protocol's own messages."""
    import numpy as np
    from fedslm.wire.codec import decode_protocol_reply, decode_secure_update

    from fedslm.messages import ADVERT, PROTOCOL_REPLIES
    from fedslm.secagg.messages import EncryptedShares, KeyAdvert, MaskedInput, UnmaskShares
    from fedslm.site import Site

    big = 2**63 + 5
    advert = KeyAdvert(big, b"c" * 32, b"m" * 32)
    plain_metrics, plain_fields = _report(True).wire_values()
    fields = {**plain_fields, **ADVERT.wire_fields(advert)}
    secure = encode_payload(Payload(ADVERT.kind, {}, plain_metrics, fields))
    report, back = decode_secure_update(secure)
    assert back == advert and report.site == "site-1" and report.state == {}
    shares = EncryptedShares(big, [1, big], [b"x", b"yz"])
    masked = MaskedInput(7, np.arange(5, dtype="<u4"))
    unmask = UnmaskShares(big, [big], [b"s"], [3], [b"k"])
    sent = {
        "share-keys": Site.shares_payload(shares),
        "masked-input": Site.masked_payload(masked),
        "unmask": Site.unmask_payload(unmask),
    }
    assert [p.kind for p in sent.values()] == [r.kind for r in PROTOCOL_REPLIES.values()]
    assert decode_protocol_reply("share-keys", encode_payload(sent["share-keys"])) == shares
    assert decode_protocol_reply("unmask", encode_payload(sent["unmask"])) == unmask
    got = decode_protocol_reply("masked-input", encode_payload(sent["masked-input"]))
    assert isinstance(got, MaskedInput) and got.site_id == 7
    np.testing.assert_array_equal(got.vector, masked.vector)
    # a protocol reply with a field too many, or one too few, is refused naming it
    extra = replace(sent["unmask"], fields={**sent["unmask"].fields, "note": "x"})
    with pytest.raises(ValueError, match="field 'note' is not part"):
        decode_protocol_reply("unmask", encode_payload(extra))
    short = replace(sent["share-keys"], fields={"site_id": 1, "recipients": [2]})
    with pytest.raises(ValueError, match="field 'ciphertexts' is missing"):
        decode_protocol_reply("share-keys", encode_payload(short))
    no_pk = {k: v for k, v in fields.items() if k != "mask_pk"}
    with pytest.raises(ValueError, match="field 'mask_pk' is missing"):
        decode_secure_update(encode_payload(Payload(ADVERT.kind, {}, plain_metrics, no_pk)))
