"""The Empirical checks (``fedslm audit``): only for a run folder that holds audit.json."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fedslm.audit import AUDIT_JSON, CANARIES_JSON, MIN_CONTROL_EPSILON
from fedslm.audit.bound import LEVEL, Bound, best_bound, count_correct
from fedslm.report.checks.base import EXACT, Discrepancy, eps_close, json_epsilon, same
from fedslm.report.runfiles import PRIVACY_FILE, RunContext, read_json

# the bound's bisection stops within 1e-6; a recomputation on another machine may land elsewhere
# in that interval, while any edit worth making moves a bound by far more
_BOUND_TOLERANCE = 1e-5


def has_audit(ctx: RunContext) -> bool:
    """Whether the run folder holds ``fedslm audit``'s result (the report's Empirical check)."""
    return (ctx.run.root / AUDIT_JSON).is_file()


def _audit(ctx: RunContext) -> dict[str, Any]:
    return read_json(ctx.run.root / AUDIT_JSON)


def _audit_bound(audit: dict[str, Any], arm: str) -> Bound:
    """One arm's bound recomputed from audit.json's m, (r, v) per r, delta and confidence."""
    run = audit[arm]
    counts = {int(r): int(g["correct"]) for r, g in run["per_guesses"].items()}
    level = 1.0 - float(run["confidence"])
    return best_bound(int(audit["canaries"]), counts, float(run["delta"]), level)


def _recount(ctx: RunContext, audit: dict[str, Any]) -> Discrepancy | None:
    """When the audit folder holds canaries.json (scores and inclusion bits), every v of
    audit.json recounted from it."""
    path = ctx.run.root / CANARIES_JSON
    if not path.is_file():
        return None
    rows = read_json(path)["canaries"]
    bits = [bool(c["included"]) for c in rows]
    for key, stored, value in (
        ("canaries", audit["canaries"], len(rows)),
        ("included", audit["included"], sum(bits)),
    ):
        if stored != value:
            return Discrepancy(
                AUDIT_JSON, audit["site"], key, stored, value, expected_label=f"{CANARIES_JSON} has"
            )
    for arm in ("audited", "control"):
        stored_v = {int(r): g["correct"] for r, g in audit[arm]["per_guesses"].items()}
        scores = [float(c[f"score_{arm}"]) for c in rows]
        for r, v in count_correct(scores, bits, list(stored_v)).items():
            if stored_v[r] != v:
                return Discrepancy(
                    AUDIT_JSON,
                    audit["site"],
                    f"{arm}.per_guesses.{r}.correct",
                    stored_v[r],
                    v,
                    expected_label=f"recounted from {CANARIES_JSON}'s scores and inclusion bits",
                )
    return None


def check_empirical_bounds(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Every lower bound of audit.json recomputed with ``fedslm.audit.bound`` from the recorded
    m, (r, v) per r, delta and confidence; each v recounted from canaries.json when the folder
    holds it."""
    audit = _audit(ctx)
    site = audit["site"]
    found = _recount(ctx, audit)
    if found is not None:
        return found
    for arm in ("audited", "control"):
        run = audit[arm]
        if not math.isclose(float(run["confidence"]), 1.0 - LEVEL, abs_tol=EXACT):
            return Discrepancy(
                AUDIT_JSON,
                site,
                f"{arm}.confidence",
                run["confidence"],
                1.0 - LEVEL,
                expected_label="fedslm audit uses",
            )
        bound = _audit_bound(audit, arm)
        for r, (v, value) in bound.per_r.items():
            stored = run["per_guesses"][str(r)]["lower_bound"]
            if not math.isclose(float(stored), value, rel_tol=0.0, abs_tol=_BOUND_TOLERANCE):
                return Discrepancy(
                    AUDIT_JSON,
                    site,
                    f"{arm}.per_guesses.{r}.lower_bound",
                    stored,
                    value,
                    note=f"m={audit['canaries']}, r={r}, v={v}, delta {run['delta']:g}, "
                    f"{len(bound.per_r)} r at level {bound.level:g} (Bonferroni)",
                )
        for key, value in (
            ("lower_bound", bound.epsilon),
            ("guesses", bound.guesses),
            ("correct", bound.correct),
        ):
            if not math.isclose(float(run[key]), value, rel_tol=0.0, abs_tol=_BOUND_TOLERANCE):
                return Discrepancy(
                    AUDIT_JSON, site, f"{arm}.{key}", run[key], value, note="the best r scanned"
                )
    return None


def check_empirical_claim(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """The audited run's empirical lower bound does not exceed the epsilon its site's ledger
    claims (privacy.json, checked against the ledger by ``site-epsilon``); audit.json records
    that epsilon and delta."""
    audit = _audit(ctx)
    site, run = audit["site"], audit["audited"]
    p = ctx.run.privacy["sites"].get(site)
    if not isinstance(p, dict) or not p.get("dp_enabled"):
        return Discrepancy(
            PRIVACY_FILE,
            site,
            f"sites.{site}.dp_enabled",
            None if not isinstance(p, dict) else p.get("dp_enabled"),
            True,
            expected_label="audit.json audited a DP run at this site:",
        )
    claimed, bound = json_epsilon(p["epsilon"]), _audit_bound(audit, "audited")
    for key, value, close in (
        ("formal_epsilon", claimed, eps_close(run["formal_epsilon"], claimed)),
        ("delta", p["delta"], same(run["delta"], p["delta"])),
    ):
        if not close:
            return Discrepancy(
                AUDIT_JSON,
                site,
                f"audited.{key}",
                run[key],
                value,
                expected_label=f"{PRIVACY_FILE} has",
            )
    violation = bound.epsilon > claimed
    if violation:
        return Discrepancy(
            AUDIT_JSON,
            site,
            "audited.lower_bound",
            note=f"empirical lower bound {bound.epsilon:.3f} exceeds the claimed epsilon "
            f"{claimed:.3f} ({p.get('accountant')}, {PRIVACY_FILE}) at "
            f"{1 - bound.level:.0%} confidence: the DP pipeline does not deliver the privacy "
            "its ledger records",
        )
    if audit["violation"] is not violation:
        return Discrepancy(AUDIT_JSON, site, "violation", audit["violation"], violation)
    return None


def check_empirical_power(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """The control (the same job and canaries with DP off) reached a clearly positive lower
    bound (at least ``MIN_CONTROL_EPSILON``), else the audit could not have seen a leak and
    the check is inconclusive."""
    audit = _audit(ctx)
    site, control = audit["site"], audit["control"]
    if control["dp"] is not False:
        return Discrepancy(
            AUDIT_JSON,
            site,
            "control.dp",
            control["dp"],
            False,
            expected_label="a control is trained with DP off:",
        )
    bound = _audit_bound(audit, "control")
    recorded_bar = float(audit["min_control_epsilon"])
    if audit["has_power"] is not (bound.epsilon >= recorded_bar):
        return Discrepancy(
            AUDIT_JSON,
            site,
            "has_power",
            audit["has_power"],
            bound.epsilon >= recorded_bar,
            note=f"control bound {bound.epsilon:.3f}, min_control_epsilon {recorded_bar:g}",
        )
    # the bar is never below fedslm's: a lowered min_control_epsilon does not make power
    bar = max(recorded_bar, MIN_CONTROL_EPSILON)
    if bound.epsilon < bar:
        lowered = (
            f" (the audit was run with a bar of {recorded_bar:g})" if recorded_bar < bar else ""
        )
        return Discrepancy(
            AUDIT_JSON,
            site,
            "control.lower_bound",
            note=f"the control (DP off) reached only {bound.epsilon:.3f}, below "
            f"{bar:g}{lowered}: the audit had no power to see a leak, so it says nothing about "
            "this run; audit again with more canaries or longer training",
            inconclusive=True,
        )
    return None
