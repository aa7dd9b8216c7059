"""Secure aggregation wired into the federation: config, update vectors, the coordinator's
protocol loop with drop-outs, the egress kinds of the protocol messages (no Flower here)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslm.acceptance import check_secagg_weight
from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator, SiteReport
from fedslm.egress import Payload, RingSpec, check, describe
from fedslm.errors import ConfigError
from fedslm.privacy.accounting import Segment
from fedslm.secagg import (
    SecAggError,
    SecAggParams,
    SecAggResult,
    SecAggSite,
    run_session_in_process,
    sum_error_bound,
)
from fedslm.secagg.adapter import (
    flatten,
    job_params,
    mean_state,
    unflatten,
    update_vector,
    vector_size,
)
from fedslm.secagg.driver import Dropout, NoReply, run_secagg_stages, site_stage
from fedslm.site import Site


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "b.lora_B.weight": torch.randn(4, 2, generator=g) * 0.1,
        "a.lora_A.weight": torch.randn(2, 4, generator=g) * 0.1,
        "head.bias": torch.randn(3, generator=g) * 0.1,
    }


# -- (a) flatten / unflatten / mean -------------------------------------------------------------


def test_flatten_unflatten_round_trip_in_sorted_order() -> None:
    s = _state(0)
    v = flatten(s)
    assert v.dtype == np.float32 and v.size == vector_size(s) == 8 + 8 + 3
    # sorted names: a.lora_A, b.lora_B, head.bias
    assert np.array_equal(v[:8], s["a.lora_A.weight"].reshape(-1).numpy())
    back = unflatten(v, s)
    assert all(torch.equal(back[k], s[k]) for k in s)
    with pytest.raises(SecAggError, match="19"):
        unflatten(np.zeros(20, dtype=np.float32), s)


def test_secure_mean_equals_fedavg_within_the_quantisation_bound() -> None:
    g = _state(1)
    sites = [_state(10 + i) for i in range(3)]
    weights = [120, 80, 200]
    params = SecAggParams(b"test-session", 3, clip_range=1.0, bits=24)
    from fedslm.secagg import run_session_in_process

    deltas = [update_vector(s, g) for s in sites]
    run = run_session_in_process(params, deltas, weights)
    new = mean_state(g, run.result)
    total = sum(weights)
    plain = {k: sum(w * s[k] for s, w in zip(sites, weights, strict=True)) / total for k in g}
    bound = sum_error_bound(total, params) / total + 1e-6  # + float32 rounding of the sum
    for k in g:
        assert torch.allclose(new[k], plain[k], atol=bound, rtol=0), k


# -- (c) validator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ({"aggregation": "exact"}, "use federation.aggregation 'fedavg-factors' or 'ffa'"),
        ({"robust": {"rule": "median"}}, "leave federation.robust at its defaults"),
        ({"robust": {"max_update_norm": 1.0}}, "leave federation.robust at its defaults"),
        ({"sites": 1}, "at least 2 sites"),
        ({"sites": 3, "secagg": {"threshold": 4}}, "threshold=4"),
        (
            {"sites": 3, "secagg": {"bits": 53}},
            "federation.secagg.max_weight=1048576 and federation.secagg.bits=53",
        ),
        (
            {"sites": 4, "secagg": {"bits": 40, "max_weight": 2**23}},
            "does not fit the 64-bit ring",
        ),
    ],
)
def test_validator_rejects_what_cannot_be_exact(update: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as exc:
        JobConfig.model_validate({"federation": {"secure_aggregation": True, **update}})
    assert fragment in str(exc.value)


@pytest.mark.parametrize(
    ("secagg", "ring"),
    [
        ({}, 64),  # 5 x 2**20 x (2**23 - 1) needs 64 bits
        ({"bits": 16, "max_weight": 13107}, 32),  # 5 x 13107 x 32767 < 2**31
        ({"bits": 16, "max_weight": 13108}, 64),  # one more and the sum may not fit
        ({"bits": 40, "max_weight": 2**20}, 64),  # 5 x 2**20 x (2**39 - 1) < 2**63
    ],
)
def test_max_weight_and_bits_choose_the_ring(secagg: dict, ring: int) -> None:
    job = JobConfig.model_validate(
        {"federation": {"sites": 5, "secure_aggregation": True, "secagg": secagg}}
    )
    params = job_params(job, b"s", 5)
    assert params.max_weight == job.federation.secagg.max_weight
    assert params.ring_bits == ring and params.dtype.itemsize == ring // 8


def test_a_site_with_more_records_than_max_weight_cannot_take_part() -> None:
    job = JobConfig.model_validate(
        {"federation": {"secure_aggregation": True, "secagg": {"max_weight": 500}}}
    )
    check_secagg_weight(job, 500, "job.yaml")  # at the bound: fits
    with pytest.raises(ConfigError) as err:
        check_secagg_weight(job, 501, "job.yaml (site a)")
    assert "job.yaml (site a): federation.secagg.max_weight=500" in str(err.value)
    assert "501 training records" in str(err.value)
    plain = JobConfig.model_validate({"federation": {"secagg": {"max_weight": 500}}})
    check_secagg_weight(plain, 10_000, "job.yaml")  # no secure sum, no bound
    # the protocol itself refuses a weight above the bound, before anything is masked
    params = job_params(job, b"s", 3)
    with pytest.raises(SecAggError, match="max_weight=500"):
        run_session_in_process(params, [np.zeros(3)] * 3, [10, 501, 10])


def test_validator_rejects_central_dp_and_accepts_the_linear_modes() -> None:
    with pytest.raises(ValueError, match=r"privacy\.central and federation\.secure_aggregation"):
        JobConfig.model_validate(
            {
                "federation": {"secure_aggregation": True},
                "privacy": {"central": {"enabled": True, "clip_norm": 1.0, "target_epsilon": 5}},
            }
        )
    for agg in ("ffa", "fedavg-factors"):
        job = JobConfig.model_validate(
            {"federation": {"secure_aggregation": True, "aggregation": agg}}
        )
        assert job.federation.secagg.bits == 24 and job.federation.secagg.threshold is None


# -- (d) the coordinator's loop with drop-outs --------------------------------------------------


class FakeSites:
    """The transport of ``run_secagg_stages`` backed by real SecAggSite logic via ``to_state``, with
    chosen sites failing at a chosen stage (an error reply: left out of the answers)."""

    def __init__(self, params: SecAggParams, updates: dict[int, np.ndarray]) -> None:
        self.params, self.updates = params, updates
        self.states: dict[int, dict] = {}
        self.adverts = []
        for i in updates:
            site = SecAggSite(params, i)
            self.adverts.append(site.advertise())
            self.states[i] = site.to_state()
        self.fail: dict[str, set[int]] = {}
        self.asked: dict[str, list[int]] = {}

    def __call__(self, stage: str, requests: Mapping[int, object]) -> dict[int, object]:
        self.asked[stage] = sorted(requests)
        answers: dict[int, object] = {}
        for i, request in requests.items():
            if i in self.fail.get(stage, set()):
                continue
            reply, self.states[i] = site_stage(
                self.params, self.states[i], stage, request, self.updates[i], 10
            )
            answers[i] = reply
        return answers


def _updates(n: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    # large, Flower-like node ids, some above 2^63
    ids = [3, 2**63 + 5, 2**64 - 2, 12345678901][:n]
    return {i: rng.uniform(-0.5, 0.5, 7).astype(np.float32) for i in ids}


@pytest.mark.parametrize("stage", ["share-keys", "masked-input", "unmask"])
def test_a_dropout_at_any_stage_above_the_threshold_still_aggregates(stage: str) -> None:
    updates = _updates(4)
    params = SecAggParams(b"s", 4, clip_range=1.0, threshold=3)
    fake = FakeSites(params, updates)
    gone = sorted(updates)[1]
    fake.fail[stage] = {gone}
    outcome = run_secagg_stages(params, fake.adverts, fake, vector_length=8)
    assert outcome.result is not None, outcome.failure
    assert outcome.dropouts == [Dropout(gone, stage, "no reply")]  # once, at its stage
    # a site that dropped before its input arrived is not in the sum; after, it is
    expected = [i for i in updates if i != gone or stage == "unmask"]
    assert sorted(outcome.result.survivors) == sorted(expected)
    plain = sum(updates[i] for i in expected) / len(expected)
    assert np.allclose(outcome.result.mean(), plain, atol=params.step, rtol=0)
    assert outcome.result.total_weight == 10 * len(expected)


def test_below_the_threshold_the_round_fails_with_a_reason() -> None:
    updates = _updates(3)
    params = SecAggParams(b"s", 3, clip_range=1.0, threshold=3)
    fake = FakeSites(params, updates)
    fake.fail["masked-input"] = {sorted(updates)[0]}
    outcome = run_secagg_stages(params, fake.adverts, fake, vector_length=8)
    assert outcome.result is None and outcome.failure is not None
    assert "threshold is 3" in outcome.failure
    assert "unmask" not in fake.asked  # nothing more was asked of the sites


def test_the_transports_reason_for_a_missing_reply_is_kept_once() -> None:
    updates = _updates(4)
    params = SecAggParams(b"s", 4, clip_range=1.0, threshold=3)
    fake = FakeSites(params, updates)
    gone = sorted(updates)[3]
    fake.fail["masked-input"] = {gone}

    def refusing(stage: str, requests: Mapping[int, object]) -> dict[int, object]:
        answers = fake(stage, requests)
        if stage == "masked-input":  # the transport knows why: the site refused
            answers[gone] = NoReply("refused: egress guard blocked the reply")
        return answers

    outcome = run_secagg_stages(params, fake.adverts, refusing, vector_length=8)
    assert outcome.result is not None and gone not in outcome.result.survivors
    assert outcome.result.dropped == [gone]
    assert outcome.dropouts == [
        Dropout(gone, "masked-input", "refused: egress guard blocked the reply")
    ]
    assert str(outcome.dropouts[0]).startswith(f"site {gone} dropped out at stage 'masked-input'")


def test_a_masked_input_of_the_wrong_length_is_a_dropout() -> None:
    updates = _updates(3)
    params = SecAggParams(b"s", 3, clip_range=1.0, threshold=2)
    fake = FakeSites(params, updates)
    bad = sorted(updates)[2]
    updates[bad] = np.zeros(9, dtype=np.float32)
    outcome = run_secagg_stages(params, fake.adverts, fake, vector_length=8)
    assert outcome.result is not None and bad not in outcome.result.survivors
    assert outcome.dropouts == [Dropout(bad, "masked-input", "malformed reply")]


# -- egress kinds -------------------------------------------------------------------------------


def _protocol_payloads() -> tuple[SecAggParams, list[Payload]]:
    updates = _updates(3)
    params = SecAggParams(b"s", 3, clip_range=1.0)
    fake = FakeSites(params, updates)
    payloads: list[Payload] = []
    real = fake.__call__

    def spy(stage: str, requests: Mapping[int, object]) -> dict[int, object]:
        answers = real(stage, requests)
        make = {
            "share-keys": Site.shares_payload,
            "masked-input": Site.masked_payload,
            "unmask": Site.unmask_payload,
        }[stage]
        payloads.extend(make(a) for a in answers.values())  # type: ignore[arg-type]
        return answers

    assert run_secagg_stages(params, fake.adverts, spy, 8).result is not None
    return params, payloads


def test_protocol_messages_pass_the_egress_guard_and_log_no_raw_bytes() -> None:
    params, payloads = _protocol_payloads()
    ring = RingSpec(8, params.dtype.str)
    kinds = set()
    for p in payloads:
        record = describe(p)
        assert check(record, {"x": (1,)}, None, ring) == [], p.kind
        kinds.add(record["kind"])
        json.dumps(record)  # bytes are logged as length + sha256, so the record is JSON
    assert kinds == {"secagg-shares", "secagg-masked", "secagg-unmask"}


def test_egress_guard_blocks_what_the_protocol_does_not_send() -> None:
    params, payloads = _protocol_payloads()
    ring = RingSpec(8, params.dtype.str)
    masked = next(p for p in payloads if p.kind == "secagg-masked")
    wrong_len = Payload(masked.kind, fields=masked.fields, vectors={"masked": np.zeros(9, "<u4")})
    assert any("shape" in m for m in check(describe(wrong_len), {}, None, RingSpec(8, "<u4")))
    wrong_dtype = Payload(masked.kind, fields=masked.fields, vectors={"masked": np.zeros(8, "<f4")})
    assert check(describe(wrong_dtype), {}, None, RingSpec(8, "<u4"))
    extra = Payload(masked.kind, fields={**masked.fields, "site": "a"}, vectors=masked.vectors)
    assert any("not part of the protocol" in m for m in check(describe(extra), {}, None, ring))
    leak = Payload(masked.kind, {"x": torch.zeros(1)}, fields=masked.fields, vectors=masked.vectors)
    assert check(describe(leak), {"x": (1,)}, None, ring)
    # a training reply under secure aggregation: advert fields, and no tensors at all
    advert = {"secagg_site_id": 3, "cipher_pk": b"k" * 32, "mask_pk": b"m" * 32}
    ok = Payload("train-secure", {}, {"num-examples": 3}, {"site": "a", "dp": False, **advert})
    assert check(describe(ok), {"x": (1,)}, None) == []
    with_tensors = Payload("train-secure", {"x": torch.zeros(1)}, {}, {"site": "a", **advert})
    assert any("carries no tensors" in m for m in check(describe(with_tensors), {"x": (1,)}, None))
    no_advert = Payload("train-secure", {}, {}, {"site": "a"})
    assert any("missing" in m for m in check(describe(no_advert), {}, None))


def test_mean_state_rejects_a_sum_of_the_wrong_size() -> None:
    g = _state(0)
    result = SecAggResult(np.zeros(5), 1, [1, 2], [], 0.0)
    with pytest.raises(SecAggError, match="5 values"):
        mean_state(g, result)


# -- the coordinator's record of a secure round -------------------------------------------------


def _secure_coordinator(tmp_path: Path, min_sites: int) -> Coordinator:
    class _Exportable(torch.nn.Module):
        """Stand-in for the PEFT model (never exported here)."""

    job = JobConfig.model_validate(
        {"federation": {"sites": 3, "min_sites": min_sites, "secure_aggregation": True}}
    )
    return Coordinator(job, tmp_path, _Exportable(), {"w": torch.ones(2)}, {})


def _report(site: str, n: int) -> SiteReport:
    return SiteReport(
        site, {}, n, 1.0, 3, 0.1, 8, Segment(0.1, 1.0, 3), 2.0, 1e-5, "prv", 1.0
    )  # fmt: skip


def test_aggregate_secure_adds_the_mean_update_and_accounts_every_site(tmp_path: Path) -> None:
    c = _secure_coordinator(tmp_path, min_sites=2)
    c.start_round(1)
    # weighted sum of deltas 10*[1,1] + 30*[3,3] = [100, 100] over weight 40 -> mean 2.5
    result = SecAggResult(np.array([100.0, 100.0]), 40, [5, 6], [7], 1e-6)
    reports = [_report("site-1", 10), _report("site-2", 30), _report("site-3", 20)]
    out = c.aggregate_secure(1, reports, ["site 7 dropped"], {}, result, ["site-1", "site-2"])
    assert out is not None
    torch.testing.assert_close(out["w"], torch.full((2,), 3.5))
    rec = c.record
    assert rec.aggregated and rec.secure_aggregation["survivors"] == ["site-1", "site-2"]
    assert rec.sites["site-3"].in_secure_sum is False
    assert "update_norm" not in rec.sites["site-1"].to_dict()  # the coordinator never saw one
    # a site that trained but dropped out spent privacy all the same
    assert set(c.privacy) == {"site-1", "site-2", "site-3"}


def test_aggregate_secure_keeps_the_adapter_when_the_protocol_failed(tmp_path: Path) -> None:
    c = _secure_coordinator(tmp_path, min_sites=2)
    c.start_round(1)
    reports = [_report("site-1", 10), _report("site-2", 30)]
    why = "secure aggregation failed: only 1 of 3 sites sent a masked input"
    assert c.aggregate_secure(1, reports, [], {}, None, [], why) is None
    assert c.record.aggregated is False and c.record.reason == why
    torch.testing.assert_close(c.state["w"], torch.ones(2))
    c.start_round(2)
    result = SecAggResult(np.array([10.0, 10.0]), 10, [5], [], 1e-6)
    assert c.aggregate_secure(2, reports, [], {}, result, ["site-1"]) is None  # below min_sites
    assert "min_sites is 2" in c.record.reason
