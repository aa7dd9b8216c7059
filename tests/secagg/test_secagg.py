"""Secure aggregation (fedslm.secagg): equals plain aggregation within the quantisation bound,
survives drop-outs down to the threshold, and shows the coordinator only masked data."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from fedslm.aggregation import fedavg
from fedslm.secagg import (
    EncryptedShares,
    MaskedInput,
    SecAggCoordinator,
    SecAggError,
    SecAggParams,
    SecAggSite,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
    encode,
    run_session_in_process,
    shamir,
)


def params(n: int = 5, **kw: object) -> SecAggParams:
    return SecAggParams(session=b"test-run/round-1", n_sites=n, **{"clip_range": 1.0, **kw})


def updates(n: int, dim: int, seed: int = 0, scale: float = 0.1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, scale, dim).astype(np.float32) for _ in range(n)]


def plain_sum(ups: list[np.ndarray], weights: list[int], p: SecAggParams) -> np.ndarray:
    """float64 weighted sum of the clipped inputs: what secure aggregation must reproduce."""
    return sum(
        w * np.clip(u.astype(np.float64), -p.clip_range, p.clip_range)
        for u, w in zip(ups, weights, strict=True)
    )


# -- (1) equal to plain aggregation within the quantisation bound ---------------------------


@pytest.mark.parametrize("ring", [64, 32])
def test_sum_of_five_1m_updates_matches_plain_sum_within_bound(ring: int) -> None:
    p = params(5) if ring == 64 else params(5, bits=16, max_weight=1)
    assert p.ring_bits == ring
    ups = updates(5, 1_000_000)
    result = run_session_in_process(p, ups).result
    error = np.abs(result.weighted_sum - plain_sum(ups, [1] * 5, p)).max()
    assert result.total_weight == 5 and result.survivors == [1, 2, 3, 4, 5]
    assert error <= 5 * p.step / 2 + 1e-12 and error <= result.sum_error_bound
    assert error > 0  # quantisation really happened: the bound is not vacuous


@pytest.mark.parametrize("seed", range(8))
def test_small_random_cases_match_plain_weighted_sum(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 8))
    p = params(
        n,
        clip_range=float(rng.choice([0.05, 1.0, 8.0])),
        bits=int(rng.choice([8, 16, 24])),
        max_weight=int(rng.choice([1, 1000, 2**20])),
        threshold=int(rng.integers(2, n + 1)),
    )
    ups = updates(n, int(rng.integers(1, 60)), seed=seed, scale=p.clip_range)  # some clipped
    weights = [int(rng.integers(1, p.max_weight + 1)) for _ in range(n)]
    result = run_session_in_process(p, ups, weights).result
    assert result.total_weight == sum(weights)
    error = np.abs(result.weighted_sum - plain_sum(ups, weights, p)).max()
    # the float64 reference has its own rounding, up to n ulps of a sum of magnitude W * clip
    reference_rounding = n * sum(weights) * p.clip_range * 2.0**-53
    assert error <= result.sum_error_bound + reference_rounding
    # the bound is the rounding bound W * step / 2, plus float64's relative 2^-52 of W * clip
    assert result.sum_error_bound <= sum(weights) * p.step / 2 * (1 + 1e-6)


# -- (2) weighted mean equals fedavg --------------------------------------------------------


def test_weighted_mean_equals_fedavg_of_flat_states_within_bound() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"layer.lora_A.weight": (8, 64), "layer.lora_B.weight": (64, 8), "head.bias": (5,)}
    states = [{k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()} for _ in range(5)]
    records = [120, 45, 3000, 7, 88]
    p = params(5, max_weight=4096)
    flat = [torch.cat([t.flatten() for t in s.values()]).numpy() for s in states]
    mean = run_session_in_process(p, flat, records).result.mean()
    expected = fedavg(zip(states, [float(r) for r in records], strict=True))
    expected_flat = torch.cat([t.flatten() for t in expected.values()]).double().numpy()
    # fedavg rounds its float64 mean to float32: allow that on top of the quantisation bound
    tolerance = p.step / 2 + np.abs(expected_flat) * 2.0**-24 + 1e-12
    assert (np.abs(mean - expected_flat) <= tolerance).all()


# -- (3) drop-outs --------------------------------------------------------------------------


def test_site_dropping_after_sharing_keys_leaves_the_survivors_sum() -> None:
    p = params(5)
    ups = updates(5, 2000, seed=1)
    result = run_session_in_process(p, ups, [1, 2, 3, 4, 5], drop_after_round1={2}).result
    assert result.survivors == [1, 3, 4, 5] and result.dropped == [2]
    expected = plain_sum([ups[i] for i in (0, 2, 3, 4)], [1, 3, 4, 5], p)
    assert result.total_weight == 13
    assert np.abs(result.weighted_sum - expected).max() <= result.sum_error_bound


def test_site_dropping_after_its_masked_input_is_still_in_the_sum() -> None:
    p = params(5)
    ups = updates(5, 2000, seed=2)
    result = run_session_in_process(p, ups, drop_after_round2={4}).result
    assert result.survivors == [1, 2, 3, 4, 5] and result.dropped == []
    assert np.abs(result.weighted_sum - plain_sum(ups, [1] * 5, p)).max() <= result.sum_error_bound


def test_drop_outs_in_both_rounds_with_state_rebuilt_every_round() -> None:
    """As a ClientApp in deployment: every message in a fresh process, state from to_state()."""
    p = params(6, threshold=3)
    ups = updates(6, 500, seed=3)
    run = run_session_in_process(
        p, ups, drop_after_round1={1, 6}, drop_after_round2={3}, via_state=True
    )
    assert run.result.survivors == [2, 3, 4, 5] and run.result.dropped == [1, 6]
    expected = plain_sum(ups[1:5], [1] * 4, p)
    assert np.abs(run.result.weighted_sum - expected).max() <= run.result.sum_error_bound


# -- (4) too few survivors ------------------------------------------------------------------


def test_fewer_than_threshold_inputs_is_an_error_naming_round_and_counts() -> None:
    with pytest.raises(SecAggError, match=r"round 2: only 2 of 5 sites .* threshold is 3"):
        run_session_in_process(params(5), updates(5, 10), drop_after_round1={1, 2, 3})


def test_fewer_than_threshold_unmasking_replies_is_an_error() -> None:
    with pytest.raises(SecAggError, match=r"round 3: only 3 of 5 sites .* threshold is 4"):
        run_session_in_process(params(5, threshold=4), updates(5, 10), drop_after_round2={1, 5})


def test_fewer_than_threshold_advertised_keys_is_an_error() -> None:
    p = params(5)
    with pytest.raises(SecAggError, match=r"round 0: only 2 of 5 sites"):
        SecAggCoordinator(p).collect_keys([SecAggSite(p, i).advertise() for i in (1, 2)])


def test_a_site_refuses_to_unmask_below_threshold_or_twice() -> None:
    """The sites enforce the threshold too, so a coordinator that ignores it learns nothing."""
    run = run_session_in_process(params(4, threshold=3), updates(4, 10))
    site = run.sites[1]
    site.stage = 3  # rewind to before its round-3 answer
    with pytest.raises(SecAggError, match="2 of 4 sites sent a masked input; threshold is 3"):
        site.unmask(UnmaskRequest([1, 2]))
    with pytest.raises(SecAggError, match="out of order"):
        site.unmask(UnmaskRequest([1, 2, 3, 4]))


# -- (5) the coordinator's view -------------------------------------------------------------


def _top_byte_chi2(values: np.ndarray, bits: int) -> float:
    counts = np.bincount((values >> np.uint64(bits - 8)).astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("ring", [64, 32])
def test_a_masked_input_looks_uniform_and_differs_from_the_input(ring: int) -> None:
    p = params(5) if ring == 64 else params(5, bits=16, max_weight=1)
    ups = updates(5, 200_000, seed=4, scale=0.01)
    run = run_session_in_process(p, ups)
    masked = next(m for m in run.messages if isinstance(m, MaskedInput) and m.site_id == 1)
    plain, _ = encode(ups[0], 1, p)
    y = masked.vector.astype(np.uint64)
    # chi-square of the top byte, 255 degrees of freedom: mean 255, sd 22.6; 400 is > 6 sd
    assert _top_byte_chi2(y, ring) < 400
    assert _top_byte_chi2(plain.astype(np.uint64), ring) > 10_000  # the statistic does detect
    u = y.astype(np.float64) / 2.0**ring
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 0.002
    assert np.mean(masked.vector == plain) < 1e-3


def test_the_coordinator_never_receives_a_plaintext_share_or_secret() -> None:
    p = params(5)
    run = run_session_in_process(p, updates(5, 100, seed=5), drop_after_round1={2})
    states = {i: s.to_state() for i, s in run.sites.items()}
    secrets = [s[k] for s in states.values() for k in ("cipher_sk", "mask_sk", "self_seed")]
    shares = [sh for s in states.values() for k in ("seed_shares", "key_shares") for sh in s[k]]
    unmasking = [m for m in run.messages if isinstance(m, UnmaskShares)]
    before = [m for m in run.messages if not isinstance(m, UnmaskShares)]
    for blob in _bytes_in(before):
        assert not any(x in blob for x in secrets + shares)
    for blob in _bytes_in(unmasking):
        assert not any(x in blob for x in secrets)
    relayed = [m for m in run.messages if isinstance(m, EncryptedShares)]
    ciphertexts = [c for m in relayed for c in m.ciphertexts]
    assert len(ciphertexts) == 5 * 4  # every pair, both directions
    assert {len(c) for c in ciphertexts} == {12 + 2 * shamir.SHARE_BYTES + 16}
    # In round 3 it gets shares of b_j for survivors and of the mask key of dropped site 2 only:
    # never both secrets of one site, which is what would unmask a single input.
    for m in unmasking:
        assert set(m.self_mask_owners).isdisjoint(m.key_owners)
        assert m.key_owners == [2]


def _bytes_in(messages: list[object]) -> list[bytes]:
    """Every bytes value (and array buffer) inside the messages."""
    out: list[bytes] = []
    stack = list(messages)
    while stack:
        v = stack.pop()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            stack.append(dataclasses.asdict(v))
        elif isinstance(v, bytes):
            out.append(v)
        elif isinstance(v, np.ndarray):
            out.append(v.tobytes())
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


def _until_inboxes(
    p: SecAggParams, n: int
) -> tuple[dict[int, SecAggSite], SecAggCoordinator, dict[int, ShareInbox]]:
    sites = {i: SecAggSite(p, i) for i in range(1, n + 1)}
    coordinator = SecAggCoordinator(p)
    roster = coordinator.collect_keys([s.advertise() for s in sites.values()])
    inboxes = coordinator.relay_shares([s.share_keys(roster) for s in sites.values()])
    return sites, coordinator, inboxes


def test_a_tampered_share_ciphertext_is_detected_naming_its_sender() -> None:
    p = params(4)
    sites, _, inboxes = _until_inboxes(p, 4)
    inbox = inboxes[1]
    k = inbox.senders.index(3)
    blobs = list(inbox.ciphertexts)
    bad = bytearray(blobs[k])
    bad[20] ^= 1
    blobs[k] = bytes(bad)
    with pytest.raises(SecAggError, match="shares site 3 sent to site 1 failed authentication"):
        sites[1].masked_input(ShareInbox(1, inbox.senders, blobs), np.zeros(10, np.float32))


def test_a_misrouted_share_ciphertext_is_detected() -> None:
    """Site 3's ciphertext for site 2, relayed to site 1, does not open there."""
    p = params(4)
    sites, _, inboxes = _until_inboxes(p, 4)
    for_site_2 = inboxes[2].ciphertexts[inboxes[2].senders.index(3)]
    inbox = inboxes[1]
    blobs = [
        for_site_2 if s == 3 else c for s, c in zip(inbox.senders, inbox.ciphertexts, strict=True)
    ]
    with pytest.raises(SecAggError, match="site 3 sent to site 1"):
        sites[1].masked_input(ShareInbox(1, inbox.senders, blobs), np.zeros(10, np.float32))


def test_a_corrupt_mask_key_share_is_detected_at_unmasking() -> None:
    p = params(4, threshold=3)
    sites, coordinator, inboxes = _until_inboxes(p, 4)
    ups = updates(4, 10)
    # site 4 drops after sharing keys: its mask key is rebuilt from shares, one of them corrupt
    request = coordinator.collect_masked(
        [sites[i].masked_input(inboxes[i], ups[i - 1]) for i in (1, 2, 3)]
    )
    replies = [sites[i].unmask(request) for i in (1, 2, 3)]
    share = bytearray(replies[0].key_shares[0])
    share[-1] ^= 1
    replies[0] = dataclasses.replace(replies[0], key_shares=[bytes(share)])
    with pytest.raises(SecAggError, match="site 4's mask key"):
        coordinator.unmask(replies)


# -- (6) Shamir -----------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [bytes(32), b"\xff" * 32, bytes(range(32))])
def test_shamir_any_threshold_subset_reconstructs(secret: bytes) -> None:
    holders = [1, 2, 7, 2**63 + 5, 2**64 - 1]  # Flower node ids are large: fine as x
    shares = shamir.split(secret, 3, holders)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    for subset in itertools.combinations(holders, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    assert shamir.combine(shares, 3) == secret


def test_shamir_below_threshold_reveals_nothing_useful() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4])
    two = {1: shares[1], 2: shares[2]}
    with pytest.raises(ValueError, match="2 shares cannot reconstruct a 3-threshold"):
        shamir.combine(two, 3)
    # Read as a 2-threshold secret they give a random field element, not the 32 bytes
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine(two, 2)
    # A lone share is fresh randomness every time: the same secret shares differently.
    assert shamir.split(secret, 3, [1, 2, 3])[1] != shamir.split(secret, 3, [1, 2, 3])[1]


def test_shamir_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), 2, [1, 1])
    with pytest.raises(ValueError, match=r"\[1, 2\^127"):
        shamir.split(bytes(32), 2, [0, 1])
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(bytes(32), 3, [1, 2])
    with pytest.raises(ValueError, match="bytes, not"):
        shamir.combine({1: b"x", 2: b"y"}, 2)


# -- parameters and encoding ----------------------------------------------------------------


def test_ring_is_32_bits_only_when_the_largest_sum_fits() -> None:
    assert params(5, bits=16, max_weight=1).ring_bits == 32
    assert params(5, bits=16, max_weight=13107).ring_bits == 32  # 5 * 13107 * 32767 < 2^31
    assert params(5, bits=16, max_weight=13108).ring_bits == 64
    assert params(5).ring_bits == 64  # default: 24 bits, weights up to 2^20
    with pytest.raises(ValueError, match="64-bit ring"):
        params(5, bits=40, max_weight=2**30)
    with pytest.raises(ValueError, match="threshold"):
        params(5, threshold=1)
    assert params(5).t == 3 and params(2).t == 2 and params(10).t == 6


def test_encode_refuses_bad_weights_and_values_and_counts_clipping() -> None:
    p = params(3, max_weight=10)
    with pytest.raises(SecAggError, match="max_weight=10"):
        encode(np.zeros(3), 11, p)
    with pytest.raises(SecAggError, match="integer"):
        encode(np.zeros(3), 2.5, p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        encode(np.array([0.0, np.nan]), 1, p)
    vector, clipped = encode(np.array([0.5, -3.0, 2.0], np.float32), 2, p)
    assert clipped == 2
    half = int(np.rint(0.5 / p.step))
    assert p.ring_bits == 32  # 3 sites * weight 10 * (2^23 - 1) < 2^31
    assert vector.view(np.int32).tolist() == [2 * half, -2 * p.qmax, 2 * p.qmax, 2]
