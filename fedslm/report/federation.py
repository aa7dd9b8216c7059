"""The federation report of a deployed run, at the coordinator, and its governance summary.

A deployed run's folder on the coordinator holds ``job.json``, ``metrics.jsonl`` and
``privacy.json``, never a site's ledger. Each site makes its own signed report at the site
(``fedslm.report.site_report``) and its operator hands it over; ``fedslm coordinator
add-report`` checks its signature against the key registered for that site at onboarding
(``sites.json``, ``fedslm coordinator add-site``) and files it under
``RUN/site-reports/SITE/``. Why handed over, not sent by the daemon: the site's privacy officer
reads what leaves before it leaves, as for every other release, and a report is not part of
the training protocol the egress guard allows.

``fedslm coordinator report RUN`` then writes:

- ``RUN/report.{json,html}`` (format ``fedslm-deployed-report``): for each site whether its
  signed report was received and its signature verified against the registry, its figures as
  the coordinator recorded them (privacy.json) beside the site's own (its report), whether
  they agree, and the run's utility per round, per site included;
- ``RUN/governance/report.{json,html,sig}`` (``variant: governance``): the same with every
  site name replaced by a stable pseudonym (HMAC-SHA256 of the name under a secret kept in
  the coordinator's state, so the same site has the same pseudonym in every run of the
  federation and nobody without the secret can tell which site it is), without per-site
  utility, record counts or keys; signed with the coordinator's report key.

``fedslm verify RUN --keys sites.json`` rebuilds the federation report from the run folder and
the site reports and checks each site's signature against the keys given (never one stored
beside a report, nor job.json's roster). ``fedslm verify RUN/governance/report.json
--coordinator-key report.pub`` recomputes every figure the summary can recompute from itself
(each epsilon from its segments, each remaining budget, every count) and checks the
coordinator's signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from fedslm import __version__
from fedslm.artifacts import write_text
from fedslm.errors import FedSLMError
from fedslm.privacy.accounting import Segment, epsilon
from fedslm.report.build import now_utc
from fedslm.report.checks.base import Discrepancy, eps_close
from fedslm.report.checks.files import job_config_sha256
from fedslm.report.model import (
    Budget,
    CheckResult,
    EpsilonFigure,
    RoundUtility,
    _Model,
    epsilon_text,
)
from fedslm.report.runfiles import (
    MANIFEST_FILE,
    METRICS_FILE,
    PRIVACY_FILE,
    ReportInputError,
    RunFiles,
    read_json,
    read_metrics,
)
from fedslm.report.sections.privacy import figure
from fedslm.report.sections.utility import round_utility
from fedslm.report.signing import SIGNATURE_FILE, TrustedKey, check_site_signature
from fedslm.report.site_report import SiteReport, read_model, read_site_report

DEPLOYED_FORMAT: Final = "fedslm-deployed-report"
SITE_REPORTS_DIR = "site-reports"
GOVERNANCE_DIR = "governance"
COORDINATOR = "coordinator"  # the signer named in a governance summary's report.sig
PSEUDONYM_SECRET = "report-pseudonyms.secret"
REPORT_KEY, REPORT_PUB = "report.key", "report.pub"


class SegmentFigure(_Model):
    """One DP-SGD segment as the coordinator recorded it (privacy.json)."""

    q: float
    sigma: float
    steps: int


class SiteOutcome(_Model):
    """One site of a deployed run: its signed report, and its figures on both sides."""

    site: str
    registered_key: str | None
    report_received: bool
    report_sha256: str | None
    signature_verified: bool
    status: str
    rounds_trained: int
    records: int | None
    dp_enabled: bool
    delta: float | None
    segments: list[SegmentFigure]
    epsilon_reported: EpsilonFigure | None
    epsilon_recomputed: EpsilonFigure | None
    ledger_head: str | None
    site_job_steps: int | None
    site_spent: EpsilonFigure | None
    site_budget: Budget | None
    site_remaining: float | None
    agrees: bool | None


class DeployedRunInfo(_Model):
    """Which deployed run the report describes."""

    run: str
    job_id: str | None
    rounds_planned: int | None
    rounds_recorded: int
    rounds_aggregated: int
    incomplete: str | None
    job_config_sha256: str | None
    job_config_sha256_recomputed: str | None


class DeployedReport(_Model):
    """A deployed run's federation report, or its governance summary (``variant``)."""

    schema_version: Literal[1] = 1
    format: Literal["fedslm-deployed-report"] = DEPLOYED_FORMAT
    variant: Literal["full", "governance"]
    generated_by: str
    generated_at: str
    run: DeployedRunInfo
    summary: list[str]
    sites: list[SiteOutcome]
    utility: list[RoundUtility]
    checks: list[CheckResult]
    notes: list[str]


# --------------------------------------------------------------------------------------------
# Reading the run folder


def is_deployed_run(folder: Path) -> bool:
    """Whether ``folder`` is a deployed run's folder (its job.json says so)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("deployment"))
    except (OSError, ValueError, AttributeError):
        return False


def _load(run_dir: Path) -> RunFiles:
    if not is_deployed_run(run_dir):
        raise ReportInputError(
            f"{run_dir}: not a deployed run folder (job.json without "
            "deployment: true); simulated runs use `fedslm report`"
        )
    privacy = read_json(run_dir / PRIVACY_FILE)
    if not isinstance(privacy, dict) or not isinstance(privacy.get("sites"), dict):
        raise ReportInputError(f"{run_dir / PRIVACY_FILE}: has no 'sites' mapping")
    return RunFiles(
        root=run_dir,
        privacy=privacy,
        metrics=read_metrics(run_dir / METRICS_FILE),
        manifest=read_json(run_dir / MANIFEST_FILE),
        adapter_meta=None,
        sites={},
    )


def _roster(run: RunFiles) -> list[str]:
    names = [str(s["name"]) for s in (run.manifest or {}).get("sites", [])]
    return names + [s for s in run.privacy["sites"] if s not in names]


def _trained_rounds(run: RunFiles, site: str) -> list[int]:
    return [
        r["round"]
        for r in run.metrics
        if isinstance(r.get("sites"), dict) and "steps" in (r["sites"].get(site) or {})
    ]


# --------------------------------------------------------------------------------------------
# A site's report at the coordinator


def site_report_path(run_dir: Path, site: str) -> Path:
    """Where a site's handed-over report is kept in the run folder."""
    return run_dir / SITE_REPORTS_DIR / site / "report.json"


def _receipt(
    run: RunFiles, site: str, trusted: TrustedKey | None
) -> tuple[bool, bool, str | None, SiteReport | None, str]:
    """(received, signature verified, sha256, parsed report, status sentence)."""
    path = site_report_path(run.root, site)
    if not path.is_file():
        return False, False, None, None, "no signed report received from the site"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if trusted is None:
        return True, False, digest, None, "received; no registered key for the site to check it"
    found = check_site_signature(site, path, trusted, f"{SITE_REPORTS_DIR}/{site}/report.json")
    if found is not None:
        return True, False, digest, None, f"received but REJECTED: {found.note or found}"
    try:
        report = read_site_report(path)
    except ReportInputError as exc:
        return True, False, digest, None, f"received but unreadable: {exc}"
    return True, True, digest, report, f"received, signed with the key registered for {site}"


def covers(report: SiteReport, job_id: str | None) -> bool:
    """Whether a site's report shows ``job_id``'s messages: made for that job or for every
    job, with the job among the data set's."""
    return job_id is not None and report.job_id in (None, job_id) and bool(report.job(job_id))


def _agreement(
    run: RunFiles, site: str, p: dict[str, Any], report: SiteReport | None
) -> tuple[bool | None, int | None, str]:
    """Whether the site's report agrees with the coordinator's record of the site."""
    if report is None:
        return None, None, ""
    job_id = run.job_id
    if report.site != site:
        return False, None, f"the report is for site {report.site!r}"
    row = report.job(job_id) if job_id and covers(report, job_id) else None
    if row is None:
        return False, None, f"the site's report does not cover job {job_id}"
    accepted = set(_trained_rounds(run, site))
    steps = sum(e.steps for e in row.entries if e.round in accepted)
    problems = []
    if p.get("dp_enabled") and steps != p.get("dp_steps"):
        problems.append(
            f"{steps} DP steps in the accepted rounds, the coordinator recorded {p.get('dp_steps')}"
        )
    head = p.get("ledger_head")
    if head and head not in {e.hash for e in row.entries}:
        problems.append(
            f"ledger head {head[:16]}… (privacy.json) is not one of the job's "
            "entries in the site's ledger"
        )
    if problems:
        return False, row.steps, "; DISAGREES with privacy.json: " + "; ".join(problems)
    return True, row.steps, "; agrees with the coordinator's record"


def _outcome(run: RunFiles, site: str, trusted: Mapping[str, TrustedKey]) -> SiteOutcome:
    p = run.privacy["sites"].get(site) or {}
    key = trusted.get(site)
    received, verified, digest, report, status = _receipt(run, site, key)
    agrees, site_steps, said = _agreement(run, site, p, report)
    segs = [
        SegmentFigure(q=s["q"], sigma=s["sigma"], steps=s["steps"]) for s in p.get("segments") or []
    ]
    delta, acc = p.get("delta"), p.get("accountant")
    reported = recomputed = None
    if p.get("dp_enabled") and delta is not None and acc is not None:
        reported = figure(p.get("epsilon"), delta, acc, f"{PRIVACY_FILE} sites.{site}.epsilon")
        recomputed = _recompute(segs, delta, f"{PRIVACY_FILE} sites.{site}.segments")
    return SiteOutcome(
        site=site,
        registered_key=key.fingerprint if key else None,
        report_received=received,
        report_sha256=digest,
        signature_verified=verified,
        status=status + said,
        rounds_trained=int(p.get("rounds", 0)),
        records=p.get("records"),
        dp_enabled=bool(p.get("dp_enabled")),
        delta=delta,
        segments=segs,
        epsilon_reported=reported,
        epsilon_recomputed=recomputed,
        ledger_head=p.get("ledger_head"),
        site_job_steps=site_steps,
        site_spent=report.spend.spent if report else None,
        site_budget=report.spend.budget if report else None,
        site_remaining=report.spend.remaining if report else None,
        agrees=agrees,
    )


def _recompute(segs: list[SegmentFigure], delta: float, where: str) -> EpsilonFigure:
    value = epsilon([Segment(s.q, s.sigma, s.steps) for s in segs], delta, "pld")
    return figure(value, delta, "pld", f"recomputed (PLD) from {where}")


# --------------------------------------------------------------------------------------------
# The report


def build_deployed_report(
    run_dir: Path,
    trusted: Mapping[str, TrustedKey],
    *,
    generated_at: str | None = None,
) -> DeployedReport:
    """The federation report of the deployed run in ``run_dir``; ``trusted`` holds the sites'
    registered keys (the coordinator's registry), against which each site's report is checked.
    Raises ``ReportInputError`` for an unreadable run folder."""
    run = _load(Path(run_dir))
    outcomes = [_outcome(run, s, trusted) for s in _roster(run)]
    config = run.config or {}
    info = DeployedRunInfo(
        run=run.root.name,
        job_id=run.job_id,
        rounds_planned=(config.get("federation") or {}).get("rounds"),
        rounds_recorded=len(run.metrics),
        rounds_aggregated=sum(bool(r.get("aggregated")) for r in run.metrics),
        incomplete=run.incomplete,
        job_config_sha256=run.privacy.get("job_fingerprint"),
        job_config_sha256_recomputed=job_config_sha256(config) if config else None,
    )
    names = [o.site for o in outcomes]
    return _assemble(
        "full", info, outcomes, [round_utility(r, names) for r in run.metrics], generated_at
    )


def _assemble(
    variant: Literal["full", "governance"],
    info: DeployedRunInfo,
    outcomes: list[SiteOutcome],
    utility: list[RoundUtility],
    generated_at: str | None,
) -> DeployedReport:
    checks = deployed_checks(info, outcomes)
    return DeployedReport(
        variant=variant,
        generated_by=f"fedslm {__version__}",
        generated_at=generated_at or now_utc(),
        run=info,
        summary=_summary(info, outcomes, checks),
        sites=outcomes,
        utility=utility,
        checks=checks,
        notes=_notes(variant),
    )


def deployed_checks(info: DeployedRunInfo, outcomes: list[SiteOutcome]) -> list[CheckResult]:
    """The checks a deployed run's report states; each recomputable from the report itself."""
    results = [
        (
            "job_identity",
            "privacy.json's job fingerprint is the sha256 of job.json's config.",
            []
            if info.job_config_sha256 == info.job_config_sha256_recomputed
            else [f"{info.job_config_sha256} != {info.job_config_sha256_recomputed}"],
        ),
        (
            "site_epsilons",
            "Each site's epsilon as reported is within 1% of the epsilon "
            "recomputed (PLD) from its segments.",
            [
                f"{o.site}: reported {o.epsilon_reported.epsilon}, recomputed "
                f"{o.epsilon_recomputed.epsilon}"
                for o in outcomes
                if o.epsilon_reported
                and o.epsilon_recomputed
                and not eps_close(o.epsilon_reported.epsilon, _inf(o.epsilon_recomputed.epsilon))
            ],
        ),
        (
            "site_signatures",
            "Every site report received is signed with the key registered for that site.",
            [
                f"{o.site}: {o.status}"
                for o in outcomes
                if o.report_received and not o.signature_verified
            ],
        ),
        (
            "site_agreement",
            "Every signed site report agrees with the coordinator's record "
            "(DP steps of the accepted rounds, ledger head).",
            [f"{o.site}: {o.status}" for o in outcomes if o.agrees is False],
        ),
    ]
    return [
        CheckResult(name=n, description=d, passed=not p, detail=p[0] if p else "ok")
        for n, d, p in results
    ]


def _inf(value: float | None) -> float:
    return float("inf") if value is None else value


def _summary(
    info: DeployedRunInfo, outcomes: list[SiteOutcome], checks: list[CheckResult]
) -> list[str]:
    got = [o.site for o in outcomes if o.signature_verified]
    missing = [o.site for o in outcomes if not o.report_received]
    lines = [
        f"Deployed run {info.run} (job {info.job_id}): {info.rounds_aggregated} of "
        f"{info.rounds_planned} planned rounds aggregated over {len(outcomes)} site(s)."
        + (f" INCOMPLETE: {info.incomplete}." if info.incomplete else ""),
        f"Signed site reports received and verified: {len(got)} of {len(outcomes)}"
        + (f" ({', '.join(got)})" if got else "")
        + (f"; none received from {', '.join(missing)}" if missing else "")
        + ".",
    ]
    for o in outcomes:
        eps = o.epsilon_reported
        shown = f"ε = {epsilon_text(eps.epsilon)} at δ = {eps.delta:g}" if eps else "no DP"
        spent = (
            f"; lifetime spend ε = {epsilon_text(o.site_spent.epsilon)} of "
            f"{o.site_budget.lifetime:g}"
            if o.site_spent and o.site_budget
            else ""
        )
        lines.append(f"{o.site}: {shown} for this job{spent}.")
    failed = [c for c in checks if not c.passed]
    lines.append(
        f"All {len(checks)} checks passed."
        if not failed
        else f"{len(failed)} of {len(checks)} checks FAILED; first: {failed[0].name}: "
        f"{failed[0].detail}"
    )
    return lines


def _notes(variant: str) -> list[str]:
    out = [
        "A site's figures beside the coordinator's come from the site's signed report, made "
        "at the site from its own ledger; the coordinator holds no ledger and cannot "
        "recompute them (the site can: `fedslm verify` with its policy).",
        "A site report counts as received only when its signature checks with the key "
        "registered for the site at onboarding (the coordinator's sites.json).",
    ]
    if variant == "governance":
        out.append(
            "Site names are replaced by pseudonyms (HMAC-SHA256 under the coordinator's "
            "secret): stable across this federation's runs, not reversible without the secret. "
            "Per-site utility, record counts and keys are left out."
        )
    return out


# --------------------------------------------------------------------------------------------
# The governance summary


def pseudonym(secret: bytes, site: str) -> str:
    """A site's stable pseudonym: the same for every run under one secret, and telling
    nothing about the name without the secret."""
    return "anon-" + hmac.new(secret, site.encode(), hashlib.sha256).hexdigest()[:12]


def governance_summary(report: DeployedReport, secret: bytes) -> DeployedReport:
    """``report`` for wider circulation: pseudonyms for site names (sorted by pseudonym, so
    the roster's order tells nothing), no keys, no record counts, no per-site utility."""
    names = {o.site: pseudonym(secret, o.site) for o in report.sites}
    pattern = re.compile(
        r"(?<![\w-])("
        + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        + r")(?![\w-])"
    )

    def hide(text: str) -> str:
        return pattern.sub(lambda m: names[m.group(1)], text) if names else text

    def hidden(f: EpsilonFigure | None) -> EpsilonFigure | None:
        return f.model_copy(update={"source": hide(f.source)}) if f is not None else None

    sites = sorted(
        (
            o.model_copy(
                update={
                    "site": names[o.site], "registered_key": None, "records": None,
                    "status": hide(o.status),
                    "epsilon_reported": hidden(o.epsilon_reported),
                    "epsilon_recomputed": hidden(o.epsilon_recomputed),
                    "site_spent": hidden(o.site_spent),
                }
            )
            for o in report.sites
        ),
        key=lambda o: o.site,
    )  # fmt: skip
    utility = [u.model_copy(update={"sites": {}}) for u in report.utility]
    return _assemble("governance", report.run, sites, utility, report.generated_at)


def recompute_governance(stored: DeployedReport) -> DeployedReport:
    """What a governance summary's own figures give when recomputed: each epsilon from its
    segments, the summary and the checks from the rows (names and statuses as stored)."""
    sites = []
    for o in stored.sites:
        recomputed = (
            _recompute(list(o.segments), o.delta, f"{PRIVACY_FILE} sites.{o.site}.segments")
            if o.epsilon_recomputed is not None and o.delta is not None
            else None
        )
        remaining = (
            o.site_budget.lifetime - o.site_spent.epsilon
            if o.site_budget and o.site_spent and o.site_spent.epsilon is not None
            else None
        )
        sites.append(
            o.model_copy(update={"epsilon_recomputed": recomputed, "site_remaining": remaining})
        )
    return _assemble("governance", stored.run, sites, list(stored.utility), stored.generated_at)


# --------------------------------------------------------------------------------------------
# The coordinator's secrets: pseudonym secret and report key


def pseudonym_secret(state_dir: Path) -> bytes:
    """The coordinator's pseudonym secret (made on first use, mode 0600)."""
    path = state_dir / PSEUDONYM_SECRET
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 16:
        raise FedSLMError(
            f"{path}: too short to be the coordinator's pseudonym secret; "
            "restore it from a backup (a new one changes every pseudonym)"
        )
    return data


def report_key(state_dir: Path) -> Path:
    """The coordinator's report-signing key (made on first use; ``report.pub`` beside it is
    what the coordinator publishes to readers of its governance summaries)."""
    from fedslm.keys import generate_key

    private = state_dir / REPORT_KEY
    if not private.exists():
        generate_key(private, state_dir / REPORT_PUB, f"fedslm-site:{COORDINATOR}")
    return private


# --------------------------------------------------------------------------------------------
# Writing and reading


def deployed_report_text(report: DeployedReport) -> str:
    """``report.json``'s exact text."""
    return report.model_dump_json(indent=2) + "\n"


def write_deployed_reports(
    run_dir: Path, trusted: Mapping[str, TrustedKey], state_dir: Path
) -> tuple[DeployedReport, DeployedReport]:
    """Write ``RUN/report.{json,html}`` and the signed ``RUN/governance/report.{json,html,sig}``;
    return both reports."""
    from fedslm.report.render import render_page
    from fedslm.report.signing import sign_site_report

    full = build_deployed_report(run_dir, trusted)
    summary = governance_summary(full, pseudonym_secret(state_dir))
    for report, folder in ((full, run_dir), (summary, run_dir / GOVERNANCE_DIR)):
        try:
            write_text(folder / "report.json", deployed_report_text(report))
            write_text(folder / "report.html", render_page("deployed.html.j2", r=report))
        except OSError as exc:
            raise ReportInputError(
                f"{exc.filename or folder}: cannot write ({exc.strerror})"
            ) from None
    sign_site_report(COORDINATOR, run_dir / GOVERNANCE_DIR / "report.json", report_key(state_dir))
    return full, summary


def read_deployed_report(path: Path) -> DeployedReport:
    """Parse a deployed run's ``report.json``; ``ReportInputError`` naming the file otherwise."""
    return read_model(DeployedReport, path, "a deployed run's report")


def add_site_report(
    run_dir: Path, folder: Path, trusted: Mapping[str, TrustedKey]
) -> tuple[str, Path]:
    """File a site's handed-over report (``FOLDER/report.{json,sig,html}``) under
    ``RUN/site-reports/SITE/`` once its signature checks with the key registered for the site
    it names, and it covers this run's job. Raises ``ReportInputError`` saying why not."""
    import shutil

    src = folder / "report.json" if folder.is_dir() else folder
    report = read_site_report(src)
    site = report.site
    run = _load(run_dir)
    if site not in _roster(run):
        raise ReportInputError(
            f"{src}: the report is site {site!r}'s, which is not in run "
            f"{run_dir.name} (sites: {', '.join(_roster(run))})"
        )
    key = trusted.get(site)
    if key is None:
        raise ReportInputError(
            f"{src}: site {site!r} is not registered at this coordinator "
            "(`fedslm coordinator add-site`); its report cannot be checked"
        )
    found = check_site_signature(site, src, key, str(src))
    if found is not None:
        raise ReportInputError(f"site {site}: report refused: {found}")
    if not covers(report, run.job_id):
        raise ReportInputError(
            f"{src}: site {site}'s report does not cover job {run.job_id} "
            f"(run {run_dir.name}); make it with `fedslm site report "
            f"--job {run.job_id}`"
        )
    dest = site_report_path(run_dir, site).parent
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", SIGNATURE_FILE, "report.html"):
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, dest / name)
    return site, dest


# --------------------------------------------------------------------------------------------
# Verifying


def full_report_discrepancy(
    report_path: Path, stored: DeployedReport, trusted: Mapping[str, TrustedKey]
) -> tuple[Discrepancy | None, list[str], list[str]]:
    """The first discrepancy of a deployed run's federation report (or None), the sites whose
    signatures were checked against ``trusted``, and those that could not be."""
    from fedslm.report.verify import first_difference

    run_dir = report_path.parent
    run = _load(run_dir)
    checked: list[str] = []
    unchecked: list[str] = []
    for site in _roster(run):
        path = site_report_path(run_dir, site)
        if not path.is_file():
            continue
        key = trusted.get(site)
        if key is None:
            unchecked.append(site)
            continue
        found = check_site_signature(site, path, key, f"{SITE_REPORTS_DIR}/{site}/report.json")
        if found is not None:
            return found, checked, unchecked
        checked.append(site)
    # A site the auditor holds no key for makes the outcome UNSIGNED whatever else holds; its
    # row is rebuilt with the key beside its report, which is never trusted, only so that the
    # other figures can still be compared.
    rebuild_keys = dict(trusted) | {s: k for s in unchecked if (k := _key_beside(run_dir, s))}
    rebuilt = build_deployed_report(run_dir, rebuild_keys, generated_at=stored.generated_at)
    found = first_difference(
        stored.model_dump(mode="json"), rebuilt.model_dump(mode="json"), str(report_path), None
    ) or _html_edited(report_path, stored)
    return found, checked, unchecked


def _key_beside(run_dir: Path, site: str) -> TrustedKey | None:
    from fedslm.keys import SiteKeyError, load_public_key

    sig = site_report_path(run_dir, site).with_name(SIGNATURE_FILE)
    try:
        line = json.loads(sig.read_text(encoding="utf-8"))["public_key"]
        return TrustedKey(site, load_public_key(line, str(sig)), f"{sig} (not trusted)")
    except (OSError, ValueError, KeyError, TypeError, SiteKeyError):
        return None


def governance_discrepancy(report_path: Path, stored: DeployedReport) -> Discrepancy | None:
    """The first figure of a governance summary that its own rows do not give again."""
    from fedslm.report.verify import first_difference

    rebuilt = recompute_governance(stored)
    found = first_difference(
        stored.model_dump(mode="json"), rebuilt.model_dump(mode="json"), str(report_path), None
    )
    return found or _html_edited(report_path, stored)


def _html_edited(report_path: Path, stored: DeployedReport) -> Discrepancy | None:
    from fedslm.report.render import render_page
    from fedslm.report.verify import html_edited

    html = report_path.with_name("report.html")
    return html_edited(html, render_page("deployed.html.j2", r=stored), str(html), None)
