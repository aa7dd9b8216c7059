"""Checks of record-level DP accounting: segments, every epsilon recomputed with PLD, and
spend within each site's policy."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedslm.privacy.accounting import epsilon
from fedslm.report.checks.base import Discrepancy, dp_sites, eps_close, json_epsilon, same
from fedslm.report.runfiles import METRICS_FILE, PRIVACY_FILE, RunContext


def check_segments(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """privacy.json's segments, steps, noise, sampling rate, delta and accountant per site are
    the ledger's entries for the rounds the coordinator accepted (metrics.jsonl)."""
    for s, p in dp_sites(ctx, sites):
        entries = ctx.accepted_entries(s)
        stored = p.get("segments") or []
        base = f"sites.{s}"
        if len(stored) != len(entries):
            return Discrepancy(
                PRIVACY_FILE,
                s,
                f"{base}.segments (count)",
                len(stored),
                len(entries),
                expected_label="ledger has",
            )
        for i, (g, e) in enumerate(zip(stored, entries, strict=True)):
            for key in ("q", "sigma", "steps"):
                if not same(g.get(key), getattr(e, key)):
                    return Discrepancy(
                        PRIVACY_FILE,
                        s,
                        f"{base}.segments[{i}].{key}",
                        g.get(key),
                        getattr(e, key),
                        note=f"ledger seq {e.seq}, round {e.round}",
                        expected_label="ledger has",
                    )
        if not entries:
            continue
        figures = {
            "dp_steps": sum(e.steps for e in entries),
            "noise_multiplier": min(e.sigma for e in entries),
            "sample_rate": max(e.q for e in entries),
            "delta": entries[-1].delta,
            "accountant": entries[-1].accountant,
            "rounds": len(entries),
        }
        for key, value in figures.items():
            if not same(p.get(key), value):
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    f"{base}.{key}",
                    p.get(key),
                    value,
                    expected_label="ledger has",
                )
    return None


def check_site_epsilons(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Every record-level epsilon in privacy.json and metrics.jsonl, recomputed from the
    ledger's segments with PLD (RDP for the RDP figure); lifetime from all the ledger's
    entries up to the head."""
    for s, p in dp_sites(ctx, sites):
        delta, acc = float(p["delta"]), str(p.get("accountant"))
        entries = ctx.accepted_entries(s)
        segs = [e.segment for e in entries]
        pld = epsilon(segs, delta, "pld")
        for key, value in (
            ("epsilon", pld),
            ("epsilon_recomputed_pld", pld),
            ("epsilon_rdp", epsilon(segs, delta, "rdp")),
        ):
            if not eps_close(p.get(key), value):
                label = "rdp" if key == "epsilon_rdp" else "pld"
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    f"sites.{s}.{key}",
                    p.get(key),
                    value,
                    note=f"{acc if key == 'epsilon' else label} stored, {label} recomputed "
                    f"from {len(segs)} ledger segments at delta {delta:g}",
                )
        view = ctx.ledger(s)
        if entries and view is not None and p.get("lifetime_epsilon_site_reported") is not None:
            head = entries[-1]
            upto = [
                e.segment for e in view.entries if e.dataset == head.dataset and e.seq <= head.seq
            ]
            life = epsilon(upto, delta, "pld")
            if not eps_close(p["lifetime_epsilon_site_reported"], life):
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    f"sites.{s}.lifetime_epsilon_site_reported",
                    p["lifetime_epsilon_site_reported"],
                    life,
                    note=f"{acc} stored, pld recomputed from {len(upto)} ledger entries",
                )
        for rec in ctx.run.metrics:
            logged = (rec.get("epsilon") or {}).get(s, "absent")
            if logged == "absent":
                continue
            k = rec["round"]
            upto_k = [e.segment for e in ctx.accepted_entries(s, k)]
            if not upto_k and logged is None:
                continue  # known to the coordinator (e.g. refused) but nothing trained yet
            value = epsilon(upto_k, delta, "pld")
            if not eps_close(logged, value):
                return Discrepancy(
                    METRICS_FILE,
                    s,
                    f"round {k} epsilon.{s}",
                    logged,
                    value,
                    note=f"{acc} stored, pld recomputed from {len(upto_k)} ledger segments",
                )
    return None


def check_policy(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """What each site spent and sent is within the policy in force (job.json): per-job and
    lifetime epsilon, delta, noise, bytes per round, rounds."""
    for s, p in dp_sites(ctx, sites):
        loc = ctx.run.sites.get(s)
        policy = (loc.policy if loc else None) or {}
        limits = policy.get("privacy") or {}
        if not limits:
            continue
        delta, acc = float(p["delta"]), p["accountant"]
        view = ctx.ledger(s)
        lifetime = math.nan
        if view is not None and view.entries:
            ds = view.bound_dataset or view.entries[-1].dataset
            # up to this job's last entry: later jobs on the data set answer to their own runs
            last = max((e.seq for e in ctx.job_entries(s)), default=None)
            upto = [e for e in view.entries if e.dataset == ds and (last is None or e.seq <= last)]
            lifetime = epsilon([e.segment for e in upto], delta, acc)
        comparisons = [
            ("epsilon", json_epsilon(p.get("epsilon")), "max_epsilon_per_job", True),
            ("lifetime epsilon (ledger, jobs up to this)", lifetime, "lifetime_epsilon", True),
            ("delta", delta, "max_delta", True),
            ("noise_multiplier", float(p["noise_multiplier"]), "min_noise_multiplier", False),
        ]
        for field, value, limit_key, is_max in comparisons:
            limit = limits.get(limit_key)
            if limit is None or math.isnan(value):
                continue
            if (value > limit) if is_max else (value < limit):
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    field,
                    value,
                    limit,
                    expected_label=f"policy privacy.{limit_key} is",
                    note="outside the site's policy",
                )
    for s in sites:
        loc = ctx.run.sites.get(s)
        cap = ((loc.policy if loc else None) or {}).get("max_bytes_per_round")
        for rec in ctx.run.metrics:
            sent = (rec.get("bytes_sent") or {}).get(s)
            if cap is not None and sent is not None and sent > cap:
                return Discrepancy(
                    METRICS_FILE,
                    s,
                    f"round {rec['round']} bytes_sent",
                    sent,
                    cap,
                    expected_label="policy max_bytes_per_round is",
                )
    return None
