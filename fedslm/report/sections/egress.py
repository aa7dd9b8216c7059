"""The report's Egress, Policies, Refusals and Failures sections: what left each site, under
which policy, and what was refused or failed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedslm.privacy.egress_log import EgressEntry
from fedslm.report.model import (
    Egress,
    EgressMessage,
    EgressTensor,
    Failure,
    PolicyInfo,
    Refusal,
    RoundBytes,
)
from fedslm.report.runfiles import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    METRICS_FILE,
    PRIVACY_FILE,
    RunContext,
    adapter_tensors,
)


def egress_messages(ctx: RunContext, sites: Sequence[str]) -> list[EgressMessage]:
    """The per-message egress log of ``sites`` for this job, from each site's ledger: every
    message sent or blocked, with its tensors (name, shape, dtype, bytes, sha256) and every
    metric and field. Sites whose ledger cannot be read contribute nothing (the ledger-chain
    check reports why)."""
    from fedslm.privacy.egress_log import egress_entries
    from fedslm.privacy.ledger import LedgerError, PrivacyLedger

    out: list[EgressMessage] = []
    for site in sites:
        loc = ctx.run.sites.get(site)
        if loc is None or not loc.ledger.is_file():
            continue
        try:
            with PrivacyLedger(loc.ledger, create=False) as ledger:
                entries = egress_entries(ledger, ctx.run.job_id)
        except LedgerError:
            continue
        out.extend(egress_message(site, e) for e in entries)
    return out


def egress_message(
    site: str, e: EgressEntry, extra_fields: dict[str, Any] | None = None
) -> EgressMessage:
    """One egress-log record as the report shows it; ``extra_fields`` go before the record's
    own fields (a site's report adds the job and the log position)."""
    rec = e.record
    return EgressMessage(
        round=e.round,
        site=site,
        kind=e.kind,
        status=e.status,
        bytes=int(rec.get("tensor_bytes", 0)),
        sha256=e.hash,
        tensors=[EgressTensor(**t) for t in rec.get("tensors", [])],
        metrics=dict(rec.get("metrics", {})),
        fields={**(extra_fields or {}), **dict(rec.get("fields", {}))},
        blocked_because=list(rec.get("blocked_because", [])),
    )


def egress(ctx: RunContext, sites: Sequence[str]) -> Egress:
    """Bytes per round per site (metrics.jsonl) and the tensors every reply carries."""
    weights = ctx.run.adapter_weights
    tensors = adapter_tensors(weights) if weights.is_file() else []
    rounds = [
        RoundBytes(
            round=rec["round"],
            sites={
                s: int(v)
                for s, v in (rec.get("bytes_sent") or {}).items()
                if s in sites and v is not None
            },
        )
        for rec in ctx.run.metrics
    ]
    totals = {s: sum(r.sites.get(s, 0) for r in rounds) for s in sites}
    log = egress_messages(ctx, sites)
    return Egress(
        what_is_sent=(
            "Each round, each site that trained sends the coordinator its adapter (every tensor "
            "below, float32, under these names), its record count, training loss, steps, "
            "timings, and its DP segment (q, sigma, steps), delta, accountant, epsilons and "
            "ledger head. Evaluation replies carry loss, accuracy and the number of "
            "evaluation records. No record leaves a site."
        ),
        tensors=tensors,
        tensor_bytes=sum(t.bytes for t in tensors),
        tensors_source=f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS} (the final adapter; every reply has "
        "the same names and shapes)",
        rounds=rounds,
        total_bytes=totals,
        per_message_log=log,
        per_message_log_note=(
            "Each site's egress guard checked every message against the agreed adapter, the "
            "metric allow-list and its byte limit, and logged it in the site's ledger before "
            "it could leave. bytes_sent (metrics.jsonl) counts each whole training reply as "
            "Flower encodes it: tensors plus metrics and DP fields."
            if log
            else "No per-message egress log in this run (made before sites logged messages). "
            "bytes_sent (metrics.jsonl) counts each whole training reply as Flower encodes "
            "it: tensors plus metrics and DP fields."
        ),
    )


def policies(ctx: RunContext, sites: Sequence[str]) -> list[PolicyInfo]:
    """Each site's policy as in force for the job (verbatim from job.json or policy.yaml)."""
    out = []
    for s in sites:
        loc = ctx.run.sites.get(s)
        source = "job.json sites[].policy" if ctx.run.manifest else f"sites/{s}/policy.yaml"
        if loc is None or loc.policy is None:
            source = "none: no site policy applied (pooled baseline data)"
        out.append(PolicyInfo(site=s, source=source, policy=loc.policy if loc else None))
    return out


def refusals(ctx: RunContext, sites: Sequence[str]) -> list[Refusal]:
    """Every refusal, from metrics.jsonl (per round) and privacy.json (per site), merged."""
    # privacy.json joins a round's reasons with "; " (which reasons may contain), so the two
    # files are matched on the joined text and metrics.jsonl's list is kept
    seen: dict[tuple[str, int | None, str], tuple[list[str], list[str]]] = {}
    for rec in ctx.run.metrics:
        for s, reasons in (rec.get("refusals") or {}).items():
            if s in sites:
                key = (s, rec["round"], "; ".join(reasons))
                seen.setdefault(key, (list(reasons), []))[1].append(
                    f"{METRICS_FILE} round {rec['round']}"
                )
    for s in sites:
        for i, text in enumerate((ctx.run.privacy["sites"].get(s) or {}).get("refusals") or []):
            rnd: int | None = None
            body = text
            head, sep, rest = text.partition(": ")
            if sep and head.startswith("round ") and head[6:].isdigit():
                rnd, body = int(head[6:]), rest
            seen.setdefault((s, rnd, body), ([body], []))[1].append(
                f"{PRIVACY_FILE} sites.{s}.refusals[{i}]"
            )
    return [
        Refusal(site=s, round=r, reasons=reasons, source="; ".join(src))
        for (s, r, _), (reasons, src) in seen.items()
    ]


def failures(ctx: RunContext, sites: Sequence[str]) -> list[Failure]:
    """Replies that failed or were rejected (metrics.jsonl), restricted to the sites named."""
    everyone = ctx.site_names()
    out = []
    for rec in ctx.run.metrics:
        for msg in rec.get("failures") or []:
            named = [s for s in everyone if s in msg]
            if not named or any(s in sites for s in named) or len(sites) == len(everyone):
                out.append(Failure(round=rec["round"], message=str(msg)))
    return out
