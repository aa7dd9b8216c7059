"""The checks a report states and ``fedslm verify`` re-runs, each against the run's own files.

A check is a name, a sentence saying what it checks, and a function of the run that returns
the first :class:`Discrepancy` it finds (or None). They run in the order of ``CHECKS``; a new
check (e.g. each site's ECDSA signature over its messages) is one more :class:`Check` passed
to :func:`register_check`, and then appears in every report and every verification.

Epsilons are recomputed from the logged (q, sigma, steps) segments with an accountant other
than the one that reported them: PLD for record-level DP, the exact closed form for central DP.
They must agree within ``EPSILON_TOLERANCE`` (the accountants' discretisation, as the
coordinator allows); every other figure must agree exactly.

The checks live in this package by group (``ledgers``, ``accounting``, ``central``,
``files``, ``empirical``; ``base`` holds :class:`Check`, :class:`Discrepancy` and the
comparisons they share); ``CHECKS`` here is the one registry.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedslm.report.checks.accounting import check_policy, check_segments, check_site_epsilons
from fedslm.report.checks.base import Check, Discrepancy
from fedslm.report.checks.central import check_central
from fedslm.report.checks.empirical import (
    check_empirical_bounds,
    check_empirical_claim,
    check_empirical_power,
    has_audit,
)
from fedslm.report.checks.files import check_dataset, check_job_identity, check_metrics
from fedslm.report.checks.ledgers import check_egress_log, check_ledger_chain, check_ledger_head
from fedslm.report.model import CheckResult
from fedslm.report.runfiles import RunContext

CHECKS: list[Check] = [
    Check(
        "ledger-chain",
        "each site's ledger: hash chain intact, every stored epsilon "
        "recomputes (PrivacyLedger.verify)",
        check_ledger_chain,
    ),
    Check(
        "ledger-head",
        "privacy.json's ledger head per site is that site's ledger entry "
        "for its last accepted round",
        check_ledger_head,
    ),
    Check(
        "data-set",
        "each site's training file has the sha256 and row count its ledger is keyed by",
        check_dataset,
    ),
    Check(
        "segments",
        "privacy.json's DP segments, steps, noise, sampling rate, delta and "
        "accountant are the ledger's",
        check_segments,
    ),
    Check(
        "site-epsilon",
        "every record-level epsilon (privacy.json, metrics.jsonl) "
        "recomputed from the ledger's segments with PLD",
        check_site_epsilons,
    ),
    Check(
        "central-epsilon",
        "every site-level epsilon recomputed with the exact closed form "
        "(and PLD, RDP); rounds released and noise scale",
        check_central,
    ),
    Check(
        "job-identity",
        "job config sha256, job id, base model sha256 and LoRA agree "
        "across privacy.json, job.json, the adapter and the ledgers",
        check_job_identity,
    ),
    Check(
        "policy",
        "spend, delta, noise and bytes per round are within each site's policy",
        check_policy,
    ),
    Check(
        "egress-log",
        "each site's egress log is intact and holds a 'sent' record with the adapter's "
        "tensors for every update the coordinator accepted",
        check_egress_log,
    ),
    Check(
        "metrics",
        "metrics.jsonl rounds in order, byte counts consistent, records equal "
        "the training files' rows",
        check_metrics,
    ),
    Check(
        "empirical-bounds",
        "fedslm audit's lower bounds (audit.json) recomputed from m, (r, v) per r, delta and "
        "confidence; v recounted from canaries.json when present",
        check_empirical_bounds,
        has_audit,
    ),
    Check(
        "empirical-claim",
        "the audited run's empirical lower bound does not exceed the epsilon its ledger claims",
        check_empirical_claim,
        has_audit,
    ),
    Check(
        "empirical-power",
        "the audit's control (DP off) reached a clearly positive lower bound "
        "(else inconclusive: the audit had no power)",
        check_empirical_power,
        has_audit,
    ),
]


def register_check(check: Check) -> None:
    """Add a check (e.g. per-site signatures); it then runs in every report and verify."""
    if any(c.name == check.name for c in CHECKS):
        raise ValueError(f"a check named {check.name!r} is already registered")
    CHECKS.append(check)


def run_checks(
    ctx: RunContext, sites: Sequence[str], names: Sequence[str] | None = None
) -> list[CheckResult]:
    """Every registered check that applies to the run, over ``sites`` in order, or only
    those ``names``."""
    return [
        c.run(ctx, sites)
        for c in CHECKS
        if (names is None or c.name in names) and c.applicable(ctx)
    ]


def first_failure(
    ctx: RunContext, sites: Sequence[str], inconclusive: list[str] | None = None
) -> tuple[str, Discrepancy] | None:
    """The first check that fails, with its discrepancy, or None (stops at the first).
    An inconclusive check does not fail; it is appended to ``inconclusive`` if given."""
    for c in CHECKS:
        if not c.applicable(ctx):
            continue
        found = c.find(ctx, sites)
        if found is not None and found.inconclusive:
            if inconclusive is not None:
                inconclusive.append(f"{c.name} inconclusive: {found}")
        elif found is not None:
            return c.name, found
    return None
