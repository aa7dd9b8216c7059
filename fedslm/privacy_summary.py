"""A run's ``privacy.json``: the coordinator's per-site privacy record, what it says about each
site's spend, the central (site-level) DP figures, and how far the run got. Pure: the
``Coordinator`` keeps the record (``SitePrivacy``) and calls these to describe it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedslm.artifacts import library_versions
from fedslm.config import JobConfig
from fedslm.privacy.accounting import (
    ACCOUNTANT_NAMES,
    EPSILON_TOLERANCE,
    Segment,
    epsilon,
    gaussian_epsilon,
)
from fedslm.privacy.central import WEIGHTING_TEXT
from fedslm.rounds import RoundRecord


@dataclass
class SitePrivacy:
    """What the coordinator knows of one site's privacy in this run: the DP segments it
    reported, its last reported epsilon and ledger head, and the rounds it refused."""

    segments: list[Segment] = field(default_factory=list)
    reported_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    max_grad_norm: float | None = None
    lifetime_epsilon: float | None = None
    ledger_head: str | None = None
    ledger_seq: int | None = None
    records: int = 0
    rounds: int = 0
    refusals: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for the resume state (``torch.load(weights_only=True)``)."""
        d = dict(self.__dict__)
        d["segments"] = [[s.q, s.sigma, s.steps] for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SitePrivacy:
        """The inverse of ``to_dict``."""
        d = dict(d)
        d["segments"] = [Segment(float(q), float(sigma), int(n)) for q, sigma, n in d["segments"]]
        return cls(**d)


def privacy_summary(
    job: JobConfig,
    privacy: Mapping[str, SitePrivacy],
    record: RoundRecord | None,
    aggregated_rounds: int,
    central_sigma: float | None,
    finished: bool = False,
) -> dict[str, Any]:
    """Per site: epsilon as the site reported it, and recomputed here from its segments;
    and how far the run got (``run``; ``finished``: the run has stopped). ``record`` is the
    round in hand (None: no round started)."""
    sites = {name: site_entry(p) for name, p in sorted(privacy.items())}
    return {
        "central": central_summary(job, central_sigma, aggregated_rounds),
        "privacy_unit": "record (one row of a site's training data), add/remove neighbours",
        "mechanism": "DP-SGD: Poisson sampling, per-example clipping, Gaussian noise (Opacus)",
        "target_epsilon": job.privacy.target_epsilon if job.privacy.enabled else None,
        "sites": sites,
        "job_fingerprint": job.fingerprint(),
        "run": run_status(job, record, aggregated_rounds, finished),
        "versions": library_versions(),
        "caveats": [
            "Opacus secure_mode (cryptographically secure noise) was not used: it "
            "needs torchcsprng, which has no release for this torch version.",
            *(
                [
                    "Central DP noise comes from torch's Mersenne Twister generator "
                    "seeded from the operating system's CSPRNG; the generator itself is "
                    "not cryptographically secure."
                ]
                if central_sigma is not None
                else []
            ),
        ],
    }


def site_entry(p: SitePrivacy) -> dict[str, Any]:
    """One site's entry of ``privacy.json``: its epsilon as reported and as recomputed from its
    segments (``epsilon_check`` says whether they agree)."""
    entry: dict[str, Any] = {
        "records": p.records,
        "rounds": p.rounds,
        "dp_enabled": bool(p.segments),
        "refusals": p.refusals,
    }
    if not (p.segments and p.delta is not None):
        return entry
    pld = epsilon(p.segments, p.delta, "pld")
    rdp = epsilon(p.segments, p.delta, "rdp")
    reported = p.reported_epsilon
    ok = (
        reported is not None
        and math.isfinite(pld)
        and abs(reported - pld) <= EPSILON_TOLERANCE * max(pld, 1e-9)
    )
    entry.update(
        epsilon=reported,
        accountant=p.accountant,
        accountant_detail=ACCOUNTANT_NAMES.get(p.accountant or "", p.accountant),
        epsilon_recomputed_pld=pld,
        epsilon_rdp=rdp,
        epsilon_check="ok" if ok else "MISMATCH",
        delta=p.delta,
        # a job of two phases (lp-lora) has two: the figures a policy's limits are checked
        # against are the least noise and the largest sampling rate of any round
        noise_multiplier=min(s.sigma for s in p.segments),
        max_grad_norm=p.max_grad_norm,
        sample_rate=max(s.q for s in p.segments),
        dp_steps=sum(s.steps for s in p.segments),
        segments=[s.to_dict() for s in p.segments],
        lifetime_epsilon_site_reported=p.lifetime_epsilon,
        ledger_head=p.ledger_head,
        ledger_head_seq=p.ledger_seq,
    )
    return entry


def run_status(
    job: JobConfig, record: RoundRecord | None, aggregated_rounds: int, finished: bool
) -> dict[str, Any]:
    """How far the run got: ``complete`` when its last round was recorded aggregated. A
    file written after a round while others remain says ``incomplete`` and not
    ``stopped``: read after a crash, it is what was on disk when the run was killed."""
    planned, rec = job.federation.rounds, record
    # no round started yet: the run stopped in round 1
    current = rec.round if rec is not None else 1
    aggregated = bool(rec is not None and rec.aggregated)
    recorded = current - (0 if aggregated else 1)
    complete = finished and recorded >= planned and aggregated
    if complete:
        note = f"all {planned} rounds recorded"
    elif finished:
        reason = rec.reason if rec is not None else None
        note = f"stopped in round {current} of {planned}: " + str(reason or "see metrics.jsonl")
    else:
        note = f"written when round {recorded} of {planned} finished, while the run went on"
    return {
        "status": "complete" if complete else "incomplete",
        "stopped": finished,
        "rounds_planned": planned,
        "rounds_finished": recorded,
        "rounds_aggregated": aggregated_rounds,
        "adapter": bool(finished and aggregated_rounds),
        "note": note,
    }


def central_epsilon(job: JobConfig, sigma: float, rounds: int, accountant: str) -> float:
    """Site-level epsilon of ``rounds`` releases with central noise multiplier ``sigma``."""
    segment = Segment(1.0, sigma, rounds)
    return epsilon([segment], job.privacy.central.delta, accountant)


def central_summary(job: JobConfig, sigma: float | None, rounds: int) -> dict[str, Any] | None:
    """Site-level DP figures after ``rounds`` released adapters, or None when central DP is
    off (``sigma`` None)."""
    c = job.privacy.central
    if sigma is None or c.clip_norm is None:
        return None
    accountant = job.privacy.accountant
    reported = central_epsilon(job, sigma, rounds, accountant)
    exact = gaussian_epsilon(sigma, rounds, c.delta)
    # inf (beyond the accountant's range, see accounting.epsilon) is a valid if empty bound
    ok = math.isinf(reported) or abs(reported - exact) <= EPSILON_TOLERANCE * max(exact, 1e-9)
    roster = len(job.federation.site_names)
    return {
        "privacy_unit": "site: everything one site contributes (all of its records), "
        "zero-out neighbours (its update replaced by nothing)",
        "mechanism": "Gaussian mechanism on the sum of site updates, each clipped to L2 "
        "norm clip_norm and weighted by at most 1, divided by the number of sites on the "
        "roster; every site is asked every round, so no sampling amplification (q = 1)",
        "covers": "every global adapter the coordinator releases (each round's and the "
        "final one); not the per-round metrics in metrics.jsonl",
        "weighting": WEIGHTING_TEXT[c.weighting],
        "records_cap": c.records_cap,
        "denominator": roster,
        "clip_norm": c.clip_norm,
        "noise_multiplier": sigma,
        "noise_std_of_mean": sigma * c.clip_norm / roster,
        "target_epsilon": c.target_epsilon,
        "rounds_released": rounds,
        "delta": c.delta,
        "epsilon": reported,
        "accountant": accountant,
        "accountant_detail": ACCOUNTANT_NAMES[accountant],
        "epsilon_recomputed_pld": central_epsilon(job, sigma, rounds, "pld"),
        "epsilon_rdp": central_epsilon(job, sigma, rounds, "rdp"),
        "epsilon_analytic": exact,
        "epsilon_analytic_detail": "closed form for composed Gaussian mechanisms "
        "(Balle and Wang 2018), fedslm.privacy.accounting.gaussian_epsilon",
        "epsilon_check": "ok" if ok else "MISMATCH",
    }
