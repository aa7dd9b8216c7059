"""Site-level DP at the coordinator: the mechanism alone, its accounting, and the coordinator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedslm.config import JobConfig, validate_config
from fedslm.coordinator import Coordinator, SiteReport
from fedslm.errors import ConfigError
from fedslm.privacy.accounting import Segment, calibrate_noise, epsilon, gaussian_epsilon
from fedslm.privacy.central import noised_mean_update, site_weight
from fedslm.robust import clip_update, update_norm

GLOBAL = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}


def _state(a: list[float], b: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(a), "b": torch.full((2, 2), b)}


def _quiet() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_clip_scales_long_updates_to_the_bound_and_leaves_short_ones() -> None:
    long = {"x": torch.tensor([3.0, 4.0]), "y": torch.tensor([12.0])}  # norm 13
    clipped, norm = clip_update(long, 1.3)
    assert norm == pytest.approx(13.0)
    assert update_norm(clipped) == pytest.approx(1.3)
    torch.testing.assert_close(clipped["y"], torch.tensor([1.2]))
    short, norm = clip_update({"x": torch.tensor([0.3, 0.4])}, 1.0)
    assert norm == pytest.approx(0.5)
    torch.testing.assert_close(short["x"], torch.tensor([0.3, 0.4]))
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"x": torch.tensor([math.nan])}, 1.0)


def test_mean_divides_by_the_roster_not_by_who_replied() -> None:
    # noise negligible: the deterministic part is sum of weighted clipped deltas / roster
    ups = [(_state([0.1, 0.0, 0.0], 0.0), 1.0), (_state([0.3, 0.0, 0.0], 0.0), 0.5)]
    out = noised_mean_update(
        GLOBAL, ups, clip_norm=10.0, noise_multiplier=1e-12, denominator=4, generator=_quiet()
    )
    assert out.sites == 2 and out.clipped == 0
    assert float(out.state["a"][0]) == pytest.approx((0.1 + 0.5 * 0.3) / 4)
    assert out.state["a"].dtype == torch.float32


def test_one_site_moves_the_noiseless_sum_by_at_most_the_bound() -> None:
    """The sensitivity the accounting assumes: removing any one site changes the sum <= C."""
    torch.manual_seed(1)
    c = 0.7
    ups = [({k: torch.randn_like(v) * 5 for k, v in GLOBAL.items()}, w) for w in (1, 0.3, 0.9)]
    full = noised_mean_update(
        GLOBAL, ups, clip_norm=c, noise_multiplier=1e-12, denominator=1, generator=_quiet()
    )
    assert full.clipped == 3
    for i in range(len(ups)):
        without = noised_mean_update(
            GLOBAL,
            ups[:i] + ups[i + 1 :],
            clip_norm=c,
            noise_multiplier=1e-12,
            denominator=1,
            generator=_quiet(),
        )
        gap = update_norm({k: full.state[k] - without.state[k] for k in GLOBAL})
        assert gap <= c * ups[i][1] + 1e-6


def test_noise_has_the_stated_standard_deviation() -> None:
    big = {"w": torch.zeros(200_000)}
    out = noised_mean_update(
        big,
        [({"w": torch.zeros(200_000)}, 1.0)],
        clip_norm=0.5,
        noise_multiplier=2.0,
        denominator=4,
        generator=_quiet(),
    )
    assert out.noise_std == pytest.approx(1.0)
    # std of the mean = sigma * C / roster = 0.25; 200k draws pin it to well under 1%
    assert float(out.state["w"].std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(out.state["w"].mean())) < 0.01


def test_weights() -> None:
    assert site_weight("uniform", 5) == 1.0
    assert site_weight("records", 50, records_cap=200) == 0.25
    assert site_weight("records", 5000, records_cap=200) == 1.0
    with pytest.raises(ValueError):
        site_weight("records", 10)


@pytest.mark.parametrize(("sigma", "rounds"), [(0.8, 5), (2.0, 10), (1.0, 50), (5.0, 3)])
def test_site_level_epsilon_matches_the_closed_form(sigma: float, rounds: int) -> None:
    """q = 1 Gaussian composition has an exact answer; every accountant must agree with it."""
    exact = gaussian_epsilon(sigma, rounds, 1e-5)
    seg = [Segment(1.0, sigma, rounds)]
    assert epsilon(seg, 1e-5, "pld") == pytest.approx(exact, rel=1e-3)
    assert epsilon(seg, 1e-5, "prv") == pytest.approx(exact, rel=0.01)
    assert epsilon(seg, 1e-5, "rdp") >= exact


def test_absurdly_small_noise_is_infinite_not_out_of_memory() -> None:
    """sigma 1e-3 would need a 7.6 GiB PLD grid; beyond the RDP ceiling it is inf at once."""
    seg = [Segment(1.0, 1e-3, 2)]
    assert epsilon(seg, 1e-5, "pld") == math.inf
    assert epsilon(seg, 1e-5, "prv") == math.inf
    assert epsilon(seg, 1e-5, "rdp") > 1e5


def test_closed_form_edges() -> None:
    assert gaussian_epsilon(1.0, 0, 1e-5) == 0.0
    assert gaussian_epsilon(0.0, 3, 1e-5) == math.inf
    # field notes: 5 always-present sites, noise 1.0, 50 rounds is about epsilon 46-55
    assert 40 < gaussian_epsilon(1.0, 50, 1e-5) < 60


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("central", "message"),
    [
        ({"enabled": True, "noise_multiplier": 1.0}, "privacy.central.clip_norm"),
        ({"enabled": True, "clip_norm": 1.0}, "exactly one of privacy.central.target_epsilon"),
        (
            {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 3},
            "exactly one",
        ),
        (
            {"enabled": True, "clip_norm": 1, "noise_multiplier": 1, "weighting": "records"},
            "records_cap",
        ),
        ({"enabled": True, "clip_norm": -1.0, "noise_multiplier": 1.0}, "clip_norm"),
        ({"enabeld": True}, "did you mean 'privacy.central.enabled'"),
    ],
)
def test_bad_central_config_names_the_key(central: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"job\.yaml") as err:
        validate_config({"privacy": {"central": central}}, source="job.yaml")
    assert message in str(err.value)


# -- in the coordinator ---------------------------------------------------------------------


class _Exportable(torch.nn.Module):
    """Stand-in for the PEFT model; these tests never export."""


def _report(site: str, value: float, n: int) -> SiteReport:
    return SiteReport(site, {"w": torch.full((4,), value)}, n, 1.0, 3, 0.1, 16, *[None] * 5)


def _coordinator(tmp_path: Path, **central: object) -> Coordinator:
    job = JobConfig.model_validate(
        {
            "federation": {"sites": 3, "min_sites": 2, "rounds": 4},
            "privacy": {"central": {"enabled": True, "clip_norm": 0.5, **central}},
        }
    )
    return Coordinator(job, tmp_path, _Exportable(), {"w": torch.zeros(4)}, {})


def test_dropout_round_is_released_and_accounted_short_round_is_not(tmp_path: Path) -> None:
    c = _coordinator(tmp_path, noise_multiplier=0.01)  # noise std 0.0017 on the mean
    c.start_round(1)
    # unequal sizes, one site dropped out: the mean still divides by the roster of 3
    out = c.aggregate(1, [_report("site-1", 1.0, 10), _report("site-2", 0.1, 500)], ["site-3"])
    assert out is not None
    # site-1's delta has norm 2 > 0.5: clipped to 0.25 per coordinate; site-2's norm 0.2 kept
    torch.testing.assert_close(out["w"], torch.full((4,), (0.25 + 0.1) / 3), rtol=0, atol=0.012)
    assert c.record.central_dp == {
        "sites": 2,
        "clipped": 1,
        "noise_std_of_mean": pytest.approx(0.01 * 0.5 / 3),
    }
    c.start_round(2)
    assert c.aggregate(2, [_report("site-1", 1.0, 10)], ["site-2", "site-3"]) is None
    summary = c.privacy_summary()["central"]
    assert summary["rounds_released"] == 1  # the round that released nothing costs nothing
    assert summary["denominator"] == 3


@pytest.mark.integration
def test_calibrated_to_the_target_and_reported_with_three_accountants(tmp_path: Path) -> None:
    c = _coordinator(tmp_path, target_epsilon=8.0)
    assert c.central_sigma == pytest.approx(calibrate_noise(8.0, 1e-5, 1.0, 4, "prv"))
    for r in range(1, 5):
        c.start_round(r)
        assert c.aggregate(r, [_report(f"site-{i}", 0.01 * i, 100) for i in (1, 2, 3)], [])
    s = c.privacy_summary()["central"]
    assert s["rounds_released"] == 4
    assert s["accountant"] == "prv" and "PRVAccountant" in s["accountant_detail"]
    exact = gaussian_epsilon(s["noise_multiplier"], 4, 1e-5)
    assert s["epsilon_analytic"] == pytest.approx(exact)
    assert s["epsilon"] <= 8.0 + 1e-9 and s["epsilon"] == pytest.approx(8.0, rel=0.01)
    assert s["epsilon_recomputed_pld"] == pytest.approx(exact, rel=1e-3)
    assert s["epsilon_rdp"] >= exact
    assert s["epsilon_check"] == "ok"


def test_noise_differs_between_runs_with_the_same_seed(tmp_path: Path) -> None:
    """Noise an observer could regenerate from the (public) job seed would protect nothing."""
    outs = []
    for sub in ("a", "b"):
        c = _coordinator(tmp_path / sub, noise_multiplier=1.0)
        c.start_round(1)
        outs.append(c.aggregate(1, [_report("site-1", 0.0, 10), _report("site-2", 0.0, 10)], []))
    assert outs[0] is not None and outs[1] is not None
    assert not torch.equal(outs[0]["w"], outs[1]["w"])


def test_off_by_default() -> None:
    assert JobConfig().privacy.central.enabled is False
