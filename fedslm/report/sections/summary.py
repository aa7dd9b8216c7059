"""The report's plain-language parts: the summary, the trust model and the notes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedslm.report.model import (
    ACCOUNTANT_LABELS,
    CheckResult,
    EpsilonFigure,
    Fingerprints,
    Privacy,
    Summary,
    epsilon_text,
)
from fedslm.report.runfiles import RunContext
from fedslm.report.sections.run import POOLED, run_kind


def _eps_text(f: EpsilonFigure | None) -> str:
    if f is None or f.epsilon is None:
        return "ε = ∞ (no guarantee)"
    return f"ε = {epsilon_text(f.epsilon)} ({ACCOUNTANT_LABELS[f.accountant]}) and δ = {f.delta:g}"


def summary(
    ctx: RunContext,
    sites: Sequence[str],
    privacy: Privacy,
    fp: Fingerprints,
    checks: list[CheckResult],
) -> Summary:
    """The plain-language summary: what, on what, who saw what, the guarantee, the checks."""
    run = ctx.run
    lora = fp.lora
    fed = (run.config or {}).get("federation") or {}
    centralized = run_kind(run) == "centralized"
    how = (
        "on the pooled data of all sites in one place (the centralized baseline)"
        if centralized
        else f"by federated training over {len(ctx.site_names())} sites "
        f"({fed.get('aggregation', 'FedAvg')}), {len(run.metrics)} rounds"
    )
    model = fp.base_model
    trained = (
        f"A LoRA adapter (rank {lora.get('r')}, alpha {lora.get('alpha')}, on "
        f"{', '.join(lora.get('target_modules') or []) or 'the family default modules'}) for "
        f"{fp.task or 'an unrecorded task'} on the frozen base model {model.name} (weights "
        f"sha256 {(model.sha256 or 'not recorded')[:16]}…), trained {how}."
    )
    if run.incomplete:
        trained = f"INCOMPLETE: {run.incomplete}. {trained}"
    data = "; ".join(
        f"{d.site}: {d.train_rows if d.train_rows is not None else '?'} training and "
        f"{d.eval_rows if d.eval_rows is not None else '?'} evaluation records"
        for d in fp.datasets
    )
    if centralized:
        saw = [
            "All sites' records were pooled in one place: this run is a baseline for "
            "comparison, not a federation; no site kept its data.",
        ]
    else:
        saw = [
            "Each site kept its records: no record, text or label left a site.",
            *_coordinator_saw(run.config),
        ]
    if centralized:
        saw.append(
            "Whoever receives the final adapter or a round's checkpoint sees a model "
            "trained on the pooled records."
        )
    else:
        saw.append(
            "Whoever receives the final adapter or a round's checkpoint sees the aggregate of "
            "the sites' updates" + (", noised for site-level DP." if privacy.central else ".")
        )

    def where(site: str) -> str:
        return "of the pooled data" if site == POOLED else f"at {site}"

    guarantees = []
    for sp in privacy.sites:
        if sp.dp_enabled:
            guarantees.append(
                f"Each record {where(sp.site)} is protected by (ε, δ)-DP with "
                f"{_eps_text(sp.epsilon)}, against anyone who sees the adapters."
            )
        elif sp.rounds_trained:
            guarantees.append(f"Records {where(sp.site)} have no DP guarantee: trained without DP.")
        else:
            guarantees.append(f"{sp.site} trained nothing in this job (no update accepted).")
    if privacy.central:
        c = privacy.central
        guarantees.append(
            f"Each site as a whole is protected by (ε, δ)-DP with {_eps_text(c.epsilon)} in "
            "the adapters the coordinator releases (not against the coordinator itself)."
        )
    failed = [c for c in checks if not c.passed and not c.inconclusive]
    open_ = [c for c in checks if c.inconclusive]
    line = (
        f"All {len(checks)} checks passed."
        if not failed and not open_
        else f"{len(checks) - len(open_)} of {len(checks)} checks passed; {open_[0].detail}"
        if not failed
        else f"{len(failed)} of {len(checks)} checks FAILED; first: {failed[0].name}: "
        f"{failed[0].detail}"
    )
    return Summary(
        trained=trained,
        data=data,
        who_saw_what=saw,
        guarantees=guarantees,
        checks_passed=not failed and not open_,
        checks_line=line,
    )


def secure_aggregation_on(config: dict[str, Any] | None) -> bool:
    """Whether the job config (job.json) ran with ``federation.secure_aggregation``."""
    return bool(((config or {}).get("federation") or {}).get("secure_aggregation"))


def _coordinator_saw(config: dict[str, Any] | None) -> list[str]:
    if secure_aggregation_on(config):
        return [
            "Secure aggregation was on: every round the coordinator learned only the "
            "records-weighted sum of the updates of the sites that completed the protocol "
            "(listed per round in metrics.jsonl, secure_aggregation.survivors) and their total "
            "record count, never one site's adapter or update.",
            "With its training reply each site sent in the clear its record count, training "
            "loss, evaluation loss and accuracy and its DP parameters; these numbers are not "
            "protected by DP or by secure aggregation.",
        ]
    return [
        "The coordinator saw each site's adapter update every round, individually: "
        "protected by DP-SGD at the site, but not hidden among the others (secure "
        "aggregation was off for this job).",
        "With each update the coordinator received the site's record count, training "
        "loss, evaluation loss and accuracy and its DP parameters; these numbers are not "
        "protected by DP.",
    ]


def _coordinator_trust(config: dict[str, Any] | None) -> str:
    if secure_aggregation_on(config):
        return (
            "The coordinator is trusted to aggregate and to log honestly, not with data, and "
            "to follow the secure-aggregation protocol: it saw only the sum of the sites' "
            "masked updates, which sites took part in each round, and each site's metrics and "
            "DP fields. The protocol is the semi-honest variant: a coordinator that lies about "
            "who dropped out or forges keys is not defended against, and it cannot screen "
            "single updates for outliers."
        )
    return (
        "The coordinator is trusted to aggregate and to log honestly, not with data: it sees "
        "each site's DP-protected update in the clear (secure aggregation was off)."
    )


def _minimums_trust(ctx: RunContext) -> str:
    """The records each site's policy required before it trained and before it reported
    evaluation figures, as its policy in force for the job says."""
    keys = ("min_train_records", "min_eval_records")
    found = {}
    for site, loc in ctx.run.sites.items():
        if loc.policy is not None:
            found[site] = tuple(loc.policy.get(k) for k in keys)
    if not found:
        return "No site policy applied, so no minimum of training or evaluation records did."
    if any(None in v for v in found.values()):
        return (
            "The site policies of this run predate min_train_records and min_eval_records: "
            "no minimum of training or evaluation records was enforced, and a site may have "
            "reported the loss of a single record."
        )
    per_site = "; ".join(f"{s}: {t} and {e}" for s, (t, e) in sorted(found.items()))
    return (
        "Each site trained only with at least min_train_records training records and sent "
        "evaluation figures only over at least min_eval_records evaluation records (withheld "
        f"otherwise), as its policy set them ({per_site}). These minimums keep a figure sent in "
        "the clear from being one record's own value; they are not a privacy guarantee (one "
        "record still moves a mean of n records by up to 1/n of its range)."
    )


def trust_model(ctx: RunContext, privacy: Privacy) -> list[str]:
    """Who has to be trusted with what for the stated guarantees to hold."""
    items = [
        "Each site runs fedslm's training itself and decides by its own policy; the "
        "record-level guarantee assumes that code ran DP-SGD with the noise, clipping and "
        "sampling shown (Poisson sampling, per-example clipping, Gaussian noise).",
        _coordinator_trust(ctx.run.config),
        "Record-level DP covers everything derived from training records through the "
        "adapters, against anyone: the coordinator, other sites, whoever gets the adapter. It "
        "does not cover the metrics sent in the clear (losses, accuracy, counts), and the "
        "evaluation records are not protected by it at all.",
        "Each site's ledger is hash-chained and privacy.json records its head, so an edit, "
        "deletion or reordering of entries is detected. Each site signs its own report with "
        "its key, and `fedslm verify --keys` checks that signature against the site's public "
        "key as the auditor holds it, never one stored in the run: someone who rewrites a "
        "ledger, privacy.json and the reports together is detected by the sites' signatures "
        "only. In a simulation the operator holds every site's key, so there the signatures "
        "show only that the operator made the report.",
        "Noise comes from non-cryptographic random number generators (see the caveats).",
        _minimums_trust(ctx),
    ]
    if privacy.central:
        items.append(
            "Site-level (central) DP assumes the coordinator added its noise as stated; it "
            "protects each site from those who receive the released adapters, not from the "
            "coordinator, which sees every update before noising."
        )
    return items


def notes(ctx: RunContext) -> list[str]:
    """What the run's files do not allow this report to check."""
    run = ctx.run
    out = [
        "metrics.jsonl logs each site's epsilon per round without its accountant or delta; "
        "the report takes both from privacy.json (the site's accountant).",
        "privacy.json lists each site's segments without their round numbers; the report "
        "takes rounds from the site's ledger.",
        "The base model's weights sha256 is as job.json and fedslm_adapter.json record it; "
        "the report does not rehash the model files.",
        "The evaluation files are fingerprinted here but not in any ledger (evaluation is "
        "not DP and spends no budget).",
    ]
    no_dp = [
        s for s, p in run.privacy["sites"].items() if p.get("rounds") and not p.get("dp_enabled")
    ]
    if no_dp:
        out.append(
            f"{', '.join(no_dp)} trained without DP: privacy.json records no ledger head for "
            "them (sites send it with DP only), so their ledgers are checked by their own "
            "hash chain alone."
        )
    if run.manifest is None:
        out.append(
            "This run has no job.json (fedslm centralized does not write one): the job "
            "config hash cannot be recomputed, and policies are read from sites/*/policy.yaml."
        )
    return out
