"""A deployed site's own report: ``fedslm site report --policy site.yaml [--job JOB_ID]``.

In a deployment each site holds only its policy, its ledger (with its egress log) and its key;
the run folder is the coordinator's. The site's privacy officer builds the site's report from
those alone: every job the data set took part in, the spend against the site's budgets,
every message that left (or was blocked), every refusal, and the heads of the ledger and of
the egress log the report covers. The report is signed with the site's key (``report.sig``,
:func:`fedslm.report.signing.sign_site_report`) and ``fedslm verify REPORT --policy site.yaml``
recomputes it at the site from the same ledger.

A report covers the ledger *up to the heads it names*: later jobs append entries, and the
report still verifies (it is rebuilt from the entries up to its heads), while an entry edited,
deleted or rewritten below them changes a hash the report holds and fails. The report never
carries a path, an address or a record: it is meant to leave the site (to the coordinator,
``fedslm coordinator add-report``), after the privacy officer has read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import ValidationError

from fedslm import __version__
from fedslm.artifacts import write_text
from fedslm.errors import ConfigError
from fedslm.policy import SitePolicy, load_policy
from fedslm.privacy.accounting import epsilon
from fedslm.privacy.egress_log import EgressEntry
from fedslm.privacy.ledger import LedgerEntry, format_time
from fedslm.report.build import now_utc
from fedslm.report.checks.base import Discrepancy
from fedslm.report.model import (
    Budget,
    CheckResult,
    EgressMessage,
    EpsilonFigure,
    Refusal,
    _Model,
    epsilon_text,
)
from fedslm.report.runfiles import LedgerView, ReportInputError, read_ledger
from fedslm.report.sections.egress import egress_message
from fedslm.report.sections.privacy import figure

SITE_FORMAT: Final = "fedslm-site-report"
M = TypeVar("M", bound=_Model)
_SLACK = 1 + 1e-9  # as the policy compares a spend with its limit
# messages that carry a training update: the adapter, or its masked vector under secure
# aggregation (fedslm.egress)
_UPDATE_KINDS = ("train", "secagg-masked")


class LedgerPosition(_Model):
    """The heads of the site's ledger and egress log this report covers (its last entries)."""

    entries_seq: int | None
    entries_hash: str | None
    egress_seq: int | None
    egress_hash: str | None


class JobEntry(_Model):
    """One ledger entry (one round of DP-SGD) of a job."""

    round: int
    q: float
    sigma: float
    steps: int
    hash: str


class SiteJob(_Model):
    """One job the data set took part in: its rounds in the ledger and its messages."""

    job_id: str
    entries: list[JobEntry]
    steps: int
    delta: float | None
    epsilon: EpsilonFigure | None
    within_per_job_limit: bool | None
    first_time: str | None
    last_time: str | None
    messages_sent: int
    messages_blocked: int
    refusals: int


class SiteSpend(_Model):
    """Everything the data set spent, composed, against the site's budget."""

    entries: int
    steps: int
    spent: EpsilonFigure | None
    budget: Budget
    remaining: float | None
    within_budget: bool | None


class SiteReport(_Model):
    """A deployed site's report (``report.json`` of ``fedslm site report``)."""

    schema_version: Literal[1] = 1
    format: Literal["fedslm-site-report"] = SITE_FORMAT
    generated_by: str
    generated_at: str
    site: str
    job_id: str | None  # the job the messages and refusals are shown for; None: every job
    dataset: str | None
    ledger: LedgerPosition
    summary: list[str]
    jobs: list[SiteJob]
    spend: SiteSpend
    messages: list[EgressMessage]
    refusals: list[Refusal]
    policy: dict[str, Any]
    checks: list[CheckResult]
    notes: list[str]

    def job(self, job_id: str) -> SiteJob | None:
        """The row of ``job_id``, if the data set took part in it."""
        return next((j for j in self.jobs if j.job_id == job_id), None)


# --------------------------------------------------------------------------------------------
# Reading what the site holds


def site_policy(path: Path) -> tuple[SitePolicy, str, Path]:
    """The site's policy, its name (``daemon.name``) and its ledger file; ``ConfigError``
    naming the key when one is missing."""
    policy = load_policy(path)
    if policy.daemon is None:
        raise ConfigError(
            f"{path}: no daemon section: a site report is for a deployed site (daemon.name "
            "names it, daemon.key signs it); a simulated run's reports come from `fedslm report`"
        )
    ledger = policy.ledger_file()
    if ledger is None:
        raise ConfigError(f"{path}: neither ledger: nor data: is set; where is the ledger?")
    return policy, policy.daemon.name, ledger


def _read(ledger_path: Path) -> tuple[LedgerView, list[EgressEntry], list[str]]:
    """The ledger (as ``read_ledger`` sees it), its egress records and the egress chain's
    problems. Raises ``ReportInputError`` when the file cannot be opened."""
    from fedslm.privacy.egress_log import egress_entries, verify_egress
    from fedslm.privacy.ledger import LedgerError, PrivacyLedger

    if not ledger_path.is_file():
        raise ReportInputError(
            f"{ledger_path}: no ledger: this site has not taken part in a job yet (or the "
            "policy's ledger: names another file)"
        )
    view = read_ledger(ledger_path)
    if view.error is not None:
        raise ReportInputError(f"{ledger_path}: {view.error}")
    try:
        with PrivacyLedger(ledger_path, create=False) as ledger:
            return view, egress_entries(ledger), verify_egress(ledger)
    except LedgerError as exc:
        raise ReportInputError(f"{ledger_path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Building


def build_site_report(
    policy: SitePolicy,
    site: str,
    ledger_path: Path,
    job_id: str | None = None,
    *,
    position: LedgerPosition | None = None,
    dataset: str | None = None,
    generated_at: str | None = None,
) -> SiteReport:
    """The site's report from its ledger and egress log, for ``job_id`` (None: every job).

    ``position`` and ``dataset`` rebuild an existing report (verify): the entries up to its
    heads, for its data set. Otherwise the report covers everything in the ledger now.
    Raises ``ReportInputError`` for an unreadable ledger or a job the ledger never saw.
    """
    view, egress, egress_problems = _read(ledger_path)
    if position is None:
        position = LedgerPosition(
            entries_seq=view.head[0] if view.head else None,
            entries_hash=None,
            egress_seq=egress[-1].seq if egress else None,
            egress_hash=None,
        )
    entries = [e for e in view.entries if position.entries_seq and e.seq <= position.entries_seq]
    messages = [e for e in egress if position.egress_seq and e.seq <= position.egress_seq]
    if dataset is None:
        dataset = view.bound_dataset or (entries[-1].dataset if entries else None)
    mine = [e for e in entries if e.dataset == dataset]
    first: dict[str, float] = {}
    touched: list[LedgerEntry | EgressEntry] = [*mine, *messages]
    for x in touched:  # jobs in the order they first touched the site
        first[x.job_id] = min(first.get(x.job_id, x.time), x.time)
    job_ids = sorted(first, key=lambda j: (first[j], j))
    if job_id is not None and job_id not in job_ids:
        known = ", ".join(job_ids) or "none"
        raise ReportInputError(
            f"{ledger_path}: job {job_id!r} is in neither the ledger nor the egress log of "
            f"this site (jobs: {known}); the job id is job.json's job_id on the coordinator"
        )
    at_head = {e.seq: e.hash for e in entries}
    at_egress = {m.seq: m.hash for m in messages}
    position = position.model_copy(
        update={
            "entries_hash": at_head.get(position.entries_seq or -1),
            "egress_hash": at_egress.get(position.egress_seq or -1),
        }
    )
    limits = policy.privacy
    jobs = [_job_row(j, mine, messages, limits.max_epsilon_per_job) for j in job_ids]
    spend = _spend(mine, policy)
    shown = [m for m in messages if job_id is None or m.job_id == job_id]
    msgs = [_message(site, m) for m in shown]
    refusals = _refusals(site, shown)
    checks = _checks(view, egress_problems, mine, messages, jobs, spend)
    return SiteReport(
        generated_by=f"fedslm {__version__}",
        generated_at=generated_at or now_utc(),
        site=site,
        job_id=job_id,
        dataset=dataset,
        ledger=position,
        summary=_summary(site, job_id, dataset, jobs, spend, msgs, refusals, position, checks),
        jobs=jobs,
        spend=spend,
        messages=msgs,
        refusals=refusals,
        # what the site allows, without its paths and addresses (they never leave the site)
        policy=policy.model_dump(mode="json", exclude={"data", "ledger", "daemon"}),
        checks=checks,
        notes=[
            "Figures are recomputed from the ledger's (q, sigma, steps) segments by fedslm "
            "report at the site; the ledger's stored epsilons are not used.",
            "Limits are the site's policy as it is when the report is made; the policy in "
            "force for an earlier job may have differed (the site's records of its policy "
            "are its own).",
            "Evaluation records are not in the ledger: evaluation spends no budget, and its "
            "figures (sent in the clear) are listed among the messages.",
        ],
    )


def _job_row(
    job_id: str, mine: Sequence[LedgerEntry], messages: Sequence[EgressEntry], per_job: float
) -> SiteJob:
    entries = [e for e in mine if e.job_id == job_id]
    msgs = [m for m in messages if m.job_id == job_id]
    eps = None
    if entries:
        last = entries[-1]
        segs = [e.segment for e in entries]
        eps = figure(
            epsilon(segs, last.delta, last.accountant),
            last.delta,
            last.accountant,
            f"recomputed at the site from the job's {len(entries)} ledger entries",
        )
    return SiteJob(
        job_id=job_id,
        entries=[
            JobEntry(round=e.round, q=e.q, sigma=e.sigma, steps=e.steps, hash=e.hash)
            for e in entries
        ],
        steps=sum(e.steps for e in entries),
        delta=entries[-1].delta if entries else None,
        epsilon=eps,
        within_per_job_limit=_within(eps, per_job),
        first_time=format_time(entries[0].time) if entries else None,
        last_time=format_time(entries[-1].time) if entries else None,
        messages_sent=sum(m.status == "sent" and m.kind != "refusal" for m in msgs),
        messages_blocked=sum(m.status == "blocked" for m in msgs),
        refusals=sum(m.kind == "refusal" for m in msgs),
    )


def _within(eps: EpsilonFigure | None, limit: float) -> bool | None:
    if eps is None:
        return None
    return eps.epsilon is not None and eps.epsilon <= limit * _SLACK


def _spend(mine: Sequence[LedgerEntry], policy: SitePolicy) -> SiteSpend:
    limits = policy.privacy
    budget = Budget(
        lifetime=limits.lifetime_epsilon,
        per_job=limits.max_epsilon_per_job,
        max_delta=limits.max_delta,
        source="the site's policy (privacy:)",
    )
    spent = None
    if mine:
        last = mine[-1]
        # read at the latest entry's delta and accountant: the reading the site's last budget
        # decision used (every entry counts whatever delta it was recorded at)
        spent = figure(
            epsilon([e.segment for e in mine], last.delta, last.accountant),
            last.delta,
            last.accountant,
            f"recomputed at the site from the data set's {len(mine)} ledger entries",
        )
    remaining = None
    if spent is not None and spent.epsilon is not None:
        remaining = limits.lifetime_epsilon - spent.epsilon
    return SiteSpend(
        entries=len(mine),
        steps=sum(e.steps for e in mine),
        spent=spent,
        budget=budget,
        remaining=remaining,
        within_budget=_within(spent, limits.lifetime_epsilon),
    )


def _message(site: str, e: EgressEntry) -> EgressMessage:
    position = {"job_id": e.job_id, "log_seq": e.seq, "logged_at": format_time(e.time)}
    return egress_message(site, e, position)


def _refusals(site: str, messages: Sequence[EgressEntry]) -> list[Refusal]:
    out = []
    for m in messages:
        if m.kind == "refusal":
            reasons = [str(r) for r in (m.record.get("fields") or {}).get("reasons") or []]
            source = f"egress log seq {m.seq}: the refusal the site sent (job {m.job_id})"
            out.append(Refusal(site=site, round=m.round, reasons=reasons, source=source))
        if m.status == "blocked":
            reasons = [str(r) for r in m.record.get("blocked_because") or []]
            source = f"egress log seq {m.seq}: a {m.kind} message the egress guard blocked"
            out.append(Refusal(site=site, round=m.round, reasons=reasons, source=source))
    return out


def _checks(
    view: LedgerView,
    egress_problems: list[str],
    mine: Sequence[LedgerEntry],
    messages: Sequence[EgressEntry],
    jobs: Sequence[SiteJob],
    spend: SiteSpend,
) -> list[CheckResult]:
    recorded = {(e.job_id, e.round) for e in mine}
    unrecorded = [
        m
        for m in messages
        if m.kind in _UPDATE_KINDS
        and m.status == "sent"
        and (m.record.get("tensors") or m.record.get("vectors"))
        and (m.job_id, m.round) not in recorded
    ]
    over = [j.job_id for j in jobs if j.within_per_job_limit is False]
    results = [
        (
            "ledger_chain",
            "The ledger's hash chain is intact and every stored epsilon recomputes.",
            list(view.problems),
        ),
        ("egress_chain", "The egress log's hash chain is intact.", egress_problems),
        (
            "spend_before_release",
            "Every training update that left was recorded in the ledger "
            "first (its job and round have an entry).",
            [
                f"egress log seq {m.seq}: job {m.job_id} round {m.round} has no ledger entry"
                for m in unrecorded
            ],
        ),
        (
            "budgets",
            "The data set's spend is within the lifetime budget and each job's within "
            "the per-job limit.",
            (
                []
                if spend.within_budget is not False
                else [
                    f"spent {spend.spent.epsilon if spend.spent else None} > lifetime "
                    f"{spend.budget.lifetime:g}"
                ]
            )
            + [f"job {j} over the per-job limit {spend.budget.per_job:g}" for j in over],
        ),
    ]
    return [
        CheckResult(name=n, description=d, passed=not p, detail=p[0] if p else "ok")
        for n, d, p in results
    ]


def _summary(
    site: str,
    job_id: str | None,
    dataset: str | None,
    jobs: Sequence[SiteJob],
    spend: SiteSpend,
    msgs: Sequence[EgressMessage],
    refusals: Sequence[Refusal],
    position: LedgerPosition,
    checks: Sequence[CheckResult],
) -> list[str]:
    scope = f"job {job_id}" if job_id else "every job"
    spent = spend.spent
    shown = "nothing" if spent is None else f"ε = {epsilon_text(spent.epsilon)}"
    sent = [m for m in msgs if m.status == "sent"]
    failed = [c for c in checks if not c.passed]
    head = (position.entries_hash or "none")[:16]
    return [
        f"Site {site}: this report covers {scope}; the data set ({dataset or 'no ledger entry'})"
        f" took part in {len(jobs)} job(s): {', '.join(j.job_id for j in jobs) or 'none'}.",
        f"The data set has spent {shown} over {spend.entries} ledger entries, against a "
        f"lifetime budget of {spend.budget.lifetime:g} (per job {spend.budget.per_job:g}); "
        f"remaining {'—' if spend.remaining is None else f'{spend.remaining:.4g}'}.",
        f"{len(sent)} message(s) left the site for {scope} "
        f"({sum(m.bytes for m in sent):,} bytes of tensors), "
        f"{sum(m.status == 'blocked' for m in msgs)} blocked by the egress guard, "
        f"{len(refusals)} refusal(s).",
        f"Ledger head: entry {position.entries_seq} ({head}…); egress log head: record "
        f"{position.egress_seq}.",
        f"All {len(checks)} checks passed."
        if not failed
        else f"{len(failed)} of {len(checks)} checks FAILED; first: {failed[0].name}: "
        f"{failed[0].detail}",
    ]


# --------------------------------------------------------------------------------------------
# Writing, reading, verifying


def site_report_text(report: SiteReport) -> str:
    """``report.json``'s exact text."""
    return report.model_dump_json(indent=2) + "\n"


def write_site_report(
    policy_path: Path, job_id: str | None, out: Path | None = None
) -> tuple[SiteReport, Path]:
    """Build, write (``report.json``, ``report.html``) and sign (``report.sig``, with
    ``daemon.key``) the site's report; return it and its folder (default
    ``daemon.state_dir/reports/JOB_ID`` or ``.../all``)."""
    from fedslm.report.render import render_page
    from fedslm.report.signing import sign_site_report

    policy, site, ledger = site_policy(policy_path)
    assert policy.daemon is not None  # site_policy checked it
    report = build_site_report(policy, site, ledger, job_id)
    folder = out or Path(policy.daemon.state_dir) / "reports" / (job_id or "all")
    if folder.exists() and not folder.is_dir():
        raise ReportInputError(f"--out {folder}: is a file, not a folder; choose a folder")
    json_path = folder / "report.json"
    try:
        write_text(json_path, site_report_text(report))
        write_text(folder / "report.html", render_page("site.html.j2", r=report))
    except OSError as exc:
        raise ReportInputError(f"{exc.filename or folder}: cannot write ({exc.strerror})") from None
    sign_site_report(site, json_path, Path(policy.daemon.key))
    return report, folder


def read_model(model: type[M], path: Path, what: str) -> M:
    """Parse ``path`` as ``model``; ``ReportInputError`` naming the file and the first bad
    field otherwise."""
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ReportInputError(f"{path}: not {what}: {where}: {err['msg']}") from None


def read_site_report(path: Path) -> SiteReport:
    """Parse a site's ``report.json``; ``ReportInputError`` naming the file otherwise."""
    return read_model(SiteReport, path, "a fedslm site report")


def site_report_discrepancy(
    report_path: Path, stored: SiteReport, policy_path: Path
) -> Discrepancy | None:
    """The first difference between a stored site report and the same report rebuilt from
    the site's ledger (up to the heads it names), or None."""
    from fedslm.report.render import render_page
    from fedslm.report.verify import first_difference, html_edited

    policy, site, ledger = site_policy(policy_path)
    if stored.site != site:
        return Discrepancy(
            str(report_path),
            stored.site,
            "site",
            stored.site,
            site,
            note="the report is another site's",
            expected_label="this policy's daemon.name is",
        )
    rebuilt = build_site_report(
        policy,
        site,
        ledger,
        stored.job_id,
        position=stored.ledger,
        dataset=stored.dataset,
        generated_at=stored.generated_at,
    )
    html = report_path.with_name("report.html")
    return first_difference(
        stored.model_dump(mode="json"), rebuilt.model_dump(mode="json"), str(report_path), site
    ) or html_edited(html, render_page("site.html.j2", r=stored), str(html), site)
