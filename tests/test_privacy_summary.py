"""privacy.json's figures as pure functions: run status, a site's epsilon check, central DP."""

from __future__ import annotations

import math

from fedslm.config import JobConfig
from fedslm.privacy.accounting import Segment, epsilon
from fedslm.privacy_summary import (
    SitePrivacy,
    central_summary,
    privacy_summary,
    run_status,
    site_entry,
)
from fedslm.rounds import RoundRecord


def _job(**central: object) -> JobConfig:
    raw: dict[str, object] = {"federation": {"sites": 2, "rounds": 3}}
    if central:
        raw["privacy"] = {"central": {"enabled": True, **central}}
    return JobConfig.model_validate(raw)


def _rec(round_num: int, aggregated: bool, reason: str | None = None) -> RoundRecord:
    rec = RoundRecord(round_num)
    rec.aggregated, rec.reason = aggregated, reason
    return rec


def test_run_status_says_how_far_the_run_got() -> None:
    job = _job()
    done = run_status(job, _rec(3, True), 3, finished=True)
    assert done["status"] == "complete" and done["adapter"] is True
    going = run_status(job, _rec(2, True), 2, finished=False)
    assert (going["status"], going["stopped"], going["rounds_finished"]) == ("incomplete", False, 2)
    assert "while the run went on" in going["note"]
    failed = run_status(job, _rec(2, False, "only 1 of 2 sites"), 1, finished=True)
    assert failed["rounds_finished"] == 1
    assert failed["note"] == "stopped in round 2 of 3: only 1 of 2 sites"
    never = run_status(job, None, 0, finished=True)
    assert never["rounds_finished"] == 0 and never["adapter"] is False


def test_site_entry_recomputes_epsilon_and_flags_a_mismatch() -> None:
    seg = Segment(0.05, 1.0, 20)
    honest = epsilon([seg], 1e-5, "pld")
    ok = site_entry(SitePrivacy([seg], honest, 1e-5, "prv", records=50, rounds=1))
    assert ok["epsilon_check"] == "ok" and ok["dp_steps"] == 20
    low = site_entry(SitePrivacy([seg], honest / 2, 1e-5, "prv"))
    assert low["epsilon_check"] == "MISMATCH"
    plain = site_entry(SitePrivacy(records=50, rounds=1))
    assert plain == {"records": 50, "rounds": 1, "dp_enabled": False, "refusals": []}


def test_central_summary_only_with_central_dp() -> None:
    assert central_summary(_job(), None, 3) is None
    job = _job(noise_multiplier=2.0, clip_norm=0.5)
    summary = central_summary(job, 2.0, 3)
    assert summary is not None
    assert summary["epsilon_check"] == "ok" and summary["rounds_released"] == 3
    assert math.isclose(summary["noise_std_of_mean"], 2.0 * 0.5 / 2)
    whole = privacy_summary(job, {}, _rec(3, True), 3, 2.0, finished=True)
    assert whole["central"] == summary
    assert any("Mersenne Twister" in c for c in whole["caveats"])


def test_a_two_phase_jobs_figures_are_its_least_noise_and_largest_sampling_rate() -> None:
    """lp-lora's probe and LoRA rounds differ: a policy's noise floor holds only if its least
    noisy round meets it, whichever phase comes first."""
    probe, lora = Segment(0.02, 3.0, 5), Segment(0.1, 0.8, 30)
    segments = [probe, probe, lora, lora]
    honest = epsilon(segments, 1e-5, "pld")
    entry = site_entry(SitePrivacy(segments, honest, 1e-5, "prv", records=500, rounds=4))
    assert (entry["noise_multiplier"], entry["sample_rate"]) == (0.8, 0.1)
    assert entry["dp_steps"] == 70 and len(entry["segments"]) == 4
