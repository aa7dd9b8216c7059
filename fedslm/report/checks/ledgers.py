"""Checks of each site's ledger and egress log: hash chains, the ledger head, and the updates
the coordinator accepted."""

from __future__ import annotations

from collections.abc import Sequence

from fedslm.report.checks.base import Discrepancy, dp_sites
from fedslm.report.runfiles import PRIVACY_FILE, RunContext, adapter_tensors


def check_ledger_chain(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Each site's ledger opens, its hash chain is intact and every stored epsilon recomputes."""
    for s in sites:
        view = ctx.ledger(s)
        if view is None:
            continue
        if view.error is not None:
            if not view.path.exists() and not ctx.trained_rounds(s):
                continue  # a site that never trained may never have opened a ledger
            return Discrepancy(ctx.run.rel(view.path), s, "ledger file", note=view.error)
        if view.problems:
            return Discrepancy(ctx.run.rel(view.path), s, "ledger entries", note=view.problems[0])
    return None


def check_egress_log(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Each site's egress log has an intact chain, and every training update the coordinator
    accepted was logged as sent, carrying exactly the adapter's tensor names and shapes."""
    from fedslm.privacy.egress_log import egress_entries, verify_egress
    from fedslm.privacy.ledger import LedgerError, PrivacyLedger

    weights = ctx.run.adapter_weights
    agreed = {t.name: list(t.shape) for t in adapter_tensors(weights)} if weights.is_file() else {}
    for s in sites:
        loc = ctx.run.sites.get(s)
        trained = ctx.trained_rounds(s)
        if loc is None or not trained:
            continue
        where = ctx.run.rel(loc.ledger)
        try:
            with PrivacyLedger(loc.ledger, create=False) as ledger:
                problems = verify_egress(ledger)
                sent = {
                    e.round: e
                    for e in egress_entries(ledger, ctx.run.job_id)
                    if e.kind == "train" and e.status == "sent"
                }
        except LedgerError as exc:
            return Discrepancy(where, s, "egress log", note=str(exc))
        if problems:
            return Discrepancy(where, s, "egress log", note=problems[0])
        if not sent:
            continue  # a run made before sites logged their messages: nothing to compare
        for r in trained:
            if r not in sent:
                return Discrepancy(
                    where, s, f"egress log, round {r}", note="an update the coordinator "
                    "accepted has no 'sent' record in the site's egress log"
                )  # fmt: skip
            shapes = {t["name"]: list(t["shape"]) for t in sent[r].record.get("tensors", [])}
            if agreed and shapes != agreed:
                return Discrepancy(
                    where, s, f"egress log, round {r}: tensors", sorted(shapes), sorted(agreed),
                    expected_label="the adapter has",
                )  # fmt: skip
    return None


def check_ledger_head(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """privacy.json's ledger head is the hash of the ledger entry of the site's last accepted
    round. Later entries may exist: other jobs on the same data set, or a round the site ran
    but the coordinator did not accept; the chain check covers them."""
    for s, p in dp_sites(ctx, sites):
        view = ctx.ledger(s)
        accepted = ctx.accepted_entries(s)
        expected = accepted[-1].hash if accepted else None
        field = f"sites.{s}.ledger_head"
        if p.get("ledger_head") != expected:
            last = view.entries[-1].hash if view and view.entries else None
            return Discrepancy(
                PRIVACY_FILE,
                s,
                field,
                p.get("ledger_head"),
                expected,
                note=f"ledger {ctx.run.rel(view.path) if view else '?'} last entry is {last}",
                expected_label="ledger has",
            )
    return None
