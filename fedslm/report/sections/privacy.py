"""The report's Privacy section: per-site record-level epsilons, budgets, lifetime spend
and the central (site-level) DP block, read from privacy.json or recomputed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedslm.privacy.accounting import ACCOUNTANT_NAMES, Segment, epsilon, gaussian_epsilon
from fedslm.privacy.ledger import format_time
from fedslm.report.model import (
    Budget,
    CentralPrivacy,
    CentralRound,
    EpsilonFigure,
    LifetimeSpend,
    Privacy,
    RoundEpsilon,
    SegmentRow,
    SitePrivacy,
)
from fedslm.report.runfiles import METRICS_FILE, PRIVACY_FILE, RunContext

ANALYTIC_DETAIL = (
    "closed form for composed Gaussian mechanisms (Balle and Wang 2018), "
    "fedslm.privacy.accounting.gaussian_epsilon"
)


RECOMPUTED = "recomputed by fedslm report"


def figure(value: Any, delta: float, accountant: str, source: str) -> EpsilonFigure:
    """An epsilon with its delta, accountant and source; infinite (or JSON null) is None."""
    eps = None if value is None or value == float("inf") else float(value)
    detail = ANALYTIC_DETAIL if accountant == "analytic" else ACCOUNTANT_NAMES[accountant]
    return EpsilonFigure(
        epsilon=eps,
        delta=float(delta),
        accountant=accountant,  # type: ignore[arg-type]
        accountant_detail=detail,
        source=source,
    )


def privacy_section(ctx: RunContext, sites: Sequence[str]) -> Privacy:
    """Unit, relation, mechanism; per-site record-level figures; the central block."""
    p = ctx.run.privacy
    # the job's delta and accountant: job.json's config, else any DP site's (no manifest)
    known = [(ctx.run.config or {}).get("privacy") or {}]
    known += [s for s in p["sites"].values() if s.get("dp_enabled")]
    reading = next((k for k in known if k.get("delta") and k.get("accountant")), None)
    target = None
    if p.get("target_epsilon") is not None and reading is not None:
        target = figure(
            p["target_epsilon"],
            reading["delta"],
            reading["accountant"],
            f"{PRIVACY_FILE} target_epsilon (noise calibrated to it with this accountant)",
        )
    return Privacy(
        privacy_unit=p.get("privacy_unit", "record"),
        neighbouring="add/remove one record of one site's training data",
        mechanism=p.get("mechanism", ""),
        calibration_target=target,
        sites=[site_privacy(ctx, s) for s in sites],
        central=central_privacy(ctx),
    )


def site_privacy(ctx: RunContext, site: str) -> SitePrivacy:
    """One site's record-level DP figures: privacy.json's, and recomputed from its ledger."""
    p = ctx.run.privacy["sites"].get(site) or {}
    src = f"{PRIVACY_FILE} sites.{site}"
    entries = ctx.accepted_entries(site)
    dp = bool(p.get("dp_enabled"))
    delta, acc = p.get("delta"), p.get("accountant")
    eps = eps_pld = eps_rdp = eps_report = None
    if dp and delta is not None and acc is not None:
        eps = figure(p.get("epsilon"), delta, acc, f"{src}.epsilon (reported by the site)")
        eps_pld = figure(
            p.get("epsilon_recomputed_pld"), delta, "pld", f"{src}.epsilon_recomputed_pld"
        )
        eps_rdp = figure(p.get("epsilon_rdp"), delta, "rdp", f"{src}.epsilon_rdp")
        segs = [Segment(g["q"], g["sigma"], g["steps"]) for g in p.get("segments") or []]
        eps_report = figure(
            epsilon(segs, delta, "pld"), delta, "pld", f"{RECOMPUTED} from {src}.segments"
        )
    return SitePrivacy(
        site=site,
        dp_enabled=dp,
        records=p.get("records"),
        rounds_trained=int(p.get("rounds", 0)),
        dp_steps=p.get("dp_steps"),
        delta=delta,
        noise_multiplier=p.get("noise_multiplier"),
        max_grad_norm=p.get("max_grad_norm"),
        sample_rate=p.get("sample_rate"),
        segments=[SegmentRow(round=e.round, q=e.q, sigma=e.sigma, steps=e.steps) for e in entries],
        epsilon=eps,
        epsilon_pld=eps_pld,
        epsilon_rdp=eps_rdp,
        epsilon_pld_report=eps_report,
        coordinator_check=p.get("epsilon_check"),
        per_round=round_epsilons(ctx, site, delta, acc) if dp else [],
        lifetime=lifetime_spend(ctx, site, p),
    )


def round_epsilons(
    ctx: RunContext, site: str, delta: float | None, accountant: str | None
) -> list[RoundEpsilon]:
    """The site's job epsilon after each round: metrics.jsonl's, and PLD from the ledger.

    metrics.jsonl does not name the accountant of its epsilons; it is the site's (privacy.json).
    """
    if delta is None or accountant is None:
        return []
    out = []
    for rec in ctx.run.metrics:
        k = rec["round"]
        logged = (rec.get("epsilon") or {}).get(site, "absent")
        segs = [e.segment for e in ctx.accepted_entries(site, k)]
        if logged == "absent" or (logged is None and not segs):
            shown = None  # not known yet, or known but nothing trained (null is not infinite here)
        else:
            shown = figure(logged, delta, accountant, f"{METRICS_FILE} round {k} epsilon.{site}")
        out.append(
            RoundEpsilon(
                round=k,
                logged=shown,
                recomputed_pld=figure(
                    epsilon(segs, delta, "pld"),
                    delta,
                    "pld",
                    f"{RECOMPUTED} from the ledger's {len(segs)} accepted segments up to round {k}",
                ),
            )
        )
    return out


def budget(ctx: RunContext, site: str) -> Budget | None:
    """The site policy's privacy limits, or None when no policy applied (pooled baseline)."""
    loc = ctx.run.sites.get(site)
    limits = ((loc.policy if loc else None) or {}).get("privacy")
    if not limits:
        return None
    where = "job.json sites[].policy.privacy" if ctx.run.manifest else f"sites/{site}/policy.yaml"
    return Budget(
        lifetime=limits["lifetime_epsilon"],
        per_job=limits["max_epsilon_per_job"],
        max_delta=limits["max_delta"],
        source=where,
    )


def lifetime_spend(ctx: RunContext, site: str, p: dict[str, Any]) -> LifetimeSpend | None:
    """Everything the site's ledger holds for the data set up to this job's last entry,
    composed, against the budget."""
    view = ctx.ledger(site)
    if view is None or view.error is not None:
        return None
    dataset = view.bound_dataset or (view.entries[-1].dataset if view.entries else None)
    # As of this job's last entry: later jobs on the same data set (simulated runs compose in
    # one ledger per data set) belong to their own reports, and must not change this one.
    last = max((e.seq for e in ctx.job_entries(site)), default=None)
    mine = [e for e in view.entries if e.dataset == dataset and (last is None or e.seq <= last)]
    # a site that trained without DP has no delta of its own; its ledger entries (noise 0)
    # still spend, and are read at the job's delta and accountant
    priv_cfg = (ctx.run.config or {}).get("privacy") or {}
    delta = p.get("delta") or priv_cfg.get("delta")
    acc = p.get("accountant") or priv_cfg.get("accountant")
    spent = spent_pld = reported = None
    lim = budget(ctx, site)
    remaining = None
    if delta is not None and acc is not None:
        segs = [e.segment for e in mine]
        how = (
            f"{RECOMPUTED} from the data set's {len(mine)} ledger entries up to this job's last, "
            "at this job's delta"
        )
        spent = figure(epsilon(segs, delta, acc), delta, acc, how)
        spent_pld = figure(epsilon(segs, delta, "pld"), delta, "pld", how)
        if "lifetime_epsilon_site_reported" in p:
            reported = figure(
                p["lifetime_epsilon_site_reported"],
                delta,
                acc,
                f"{PRIVACY_FILE} sites.{site}.lifetime_epsilon_site_reported",
            )
        if lim is not None and spent.epsilon is not None:
            remaining = lim.lifetime - spent.epsilon
    return LifetimeSpend(
        ledger=ctx.run.rel(view.path),
        dataset=dataset,
        entries=len(mine),
        jobs=sorted({e.job_id for e in mine}),
        steps=sum(e.steps for e in mine),
        first_entry=format_time(mine[0].time) if mine else None,
        last_entry=format_time(mine[-1].time) if mine else None,
        spent=spent,
        spent_pld=spent_pld,
        site_reported=reported,
        budget=lim,
        remaining=remaining,
        ledger_head_in_privacy_json=p.get("ledger_head"),
        ledger_last_hash=mine[-1].hash if mine else None,  # the last entry counted here
    )


def central_privacy(ctx: RunContext) -> CentralPrivacy | None:
    """privacy.json's site-level block, its epsilon recomputed in closed form, per round."""
    c = ctx.run.privacy.get("central")
    if not c:
        return None
    src = f"{PRIVACY_FILE} central"
    delta, acc, sigma = float(c["delta"]), c["accountant"], float(c["noise_multiplier"])
    rounds = int(c["rounds_released"])
    per_round, done = [], 0
    for rec in ctx.run.metrics:
        done += bool(rec.get("aggregated"))
        cdp = rec.get("central_dp") or {}
        k = rec["round"]
        per_round.append(
            CentralRound(
                round=k,
                aggregated=bool(rec.get("aggregated")),
                sites=cdp.get("sites"),
                clipped=cdp.get("clipped"),
                noise_std_of_mean=cdp.get("noise_std_of_mean"),
                logged=figure(
                    rec.get("central_epsilon"),
                    delta,
                    acc,
                    f"{METRICS_FILE} round {k} central_epsilon",
                )
                if "central_epsilon" in rec
                else None,
                recomputed_analytic=figure(
                    gaussian_epsilon(sigma, done, delta),
                    delta,
                    "analytic",
                    f"{RECOMPUTED}: {done} Gaussian mechanisms, noise {sigma:g}",
                ),
            )
        )
    target = c.get("target_epsilon")
    return CentralPrivacy(
        privacy_unit=c["privacy_unit"],
        mechanism=c["mechanism"],
        covers=c["covers"],
        weighting=c["weighting"],
        records_cap=c.get("records_cap"),
        denominator=int(c["denominator"]),
        clip_norm=float(c["clip_norm"]),
        noise_multiplier=sigma,
        noise_std_of_mean=float(c["noise_std_of_mean"]),
        rounds_released=rounds,
        delta=delta,
        calibration_target=None
        if target is None
        else figure(target, delta, acc, f"{src}.target_epsilon (noise calibrated to it)"),
        epsilon=figure(c.get("epsilon"), delta, acc, f"{src}.epsilon"),
        epsilon_pld=figure(
            c.get("epsilon_recomputed_pld"), delta, "pld", f"{src}.epsilon_recomputed_pld"
        ),
        epsilon_rdp=figure(c.get("epsilon_rdp"), delta, "rdp", f"{src}.epsilon_rdp"),
        epsilon_analytic=figure(
            c.get("epsilon_analytic"), delta, "analytic", f"{src}.epsilon_analytic"
        ),
        epsilon_analytic_report=figure(
            gaussian_epsilon(sigma, rounds, delta),
            delta,
            "analytic",
            f"{RECOMPUTED} from {src}.noise_multiplier and rounds_released",
        ),
        coordinator_check=c.get("epsilon_check"),
        per_round=per_round,
    )
