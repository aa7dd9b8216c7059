"""The check of central (site-level) DP: every epsilon recomputed with the exact closed form."""

from __future__ import annotations

from collections.abc import Sequence

from fedslm.privacy.accounting import EPSILON_TOLERANCE, Segment, epsilon, gaussian_epsilon
from fedslm.report.checks.base import Discrepancy, eps_close, same
from fedslm.report.runfiles import METRICS_FILE, PRIVACY_FILE, RunContext


def check_central(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Central (site-level) DP: every epsilon recomputed from (noise, rounds released, delta)
    with the exact closed form (and PLD, RDP for theirs); rounds released, roster and noise
    scale against metrics.jsonl and job.json."""
    c = ctx.run.privacy.get("central")
    if not c:
        return None
    try:
        sigma, delta, clip = float(c["noise_multiplier"]), float(c["delta"]), float(c["clip_norm"])
        rounds, denominator = int(c["rounds_released"]), int(c["denominator"])
    except (KeyError, TypeError, ValueError) as exc:
        return Discrepancy(PRIVACY_FILE, None, f"central.{exc}", note="missing or not a number")
    aggregated = [r["round"] for r in ctx.run.metrics if r.get("aggregated")]
    if rounds != len(aggregated):
        return Discrepancy(
            PRIVACY_FILE,
            None,
            "central.rounds_released",
            rounds,
            len(aggregated),
            note="rounds aggregated in metrics.jsonl",
            expected_label="metrics.jsonl has",
        )
    roster = len(ctx.run.sites) if ctx.run.manifest else None
    if roster is not None and denominator != roster:
        return Discrepancy(
            PRIVACY_FILE,
            None,
            "central.denominator",
            denominator,
            roster,
            expected_label="job.json sites",
            note="the mean divides by the roster size",
        )
    exact = gaussian_epsilon(sigma, rounds, delta)
    seg = [Segment(1.0, sigma, rounds)]
    for key, value, tol, how in (
        ("epsilon", exact, EPSILON_TOLERANCE, "exact closed form"),
        ("epsilon_analytic", exact, 1e-6, "exact closed form"),
        ("epsilon_recomputed_pld", epsilon(seg, delta, "pld"), EPSILON_TOLERANCE, "pld"),
        ("epsilon_rdp", epsilon(seg, delta, "rdp"), EPSILON_TOLERANCE, "rdp"),
    ):
        # the coordinator accepts an infinite reported epsilon (beyond the accountant's range)
        if key == "epsilon" and c.get(key) is None:
            continue
        if not eps_close(c.get(key), value, tol):
            return Discrepancy(
                PRIVACY_FILE,
                None,
                f"central.{key}",
                c.get(key),
                value,
                note=f"{how}, noise {sigma:g}, {rounds} rounds, delta {delta:g}",
            )
    std = sigma * clip / denominator
    if not same(c.get("noise_std_of_mean"), std):
        return Discrepancy(
            PRIVACY_FILE, None, "central.noise_std_of_mean", c.get("noise_std_of_mean"), std
        )
    done = 0
    for rec in ctx.run.metrics:
        done += bool(rec.get("aggregated"))
        if "central_epsilon" in rec:
            value = gaussian_epsilon(sigma, done, delta)
            if rec["central_epsilon"] is not None and not eps_close(rec["central_epsilon"], value):
                return Discrepancy(
                    METRICS_FILE,
                    None,
                    f"round {rec['round']} central_epsilon",
                    rec["central_epsilon"],
                    value,
                    note=f"exact closed form, {done} rounds",
                )
        logged = (rec.get("central_dp") or {}).get("noise_std_of_mean")
        if logged is not None and not same(logged, std):
            return Discrepancy(
                METRICS_FILE,
                None,
                f"round {rec['round']} central_dp.noise_std_of_mean",
                logged,
                std,
            )
    return None
