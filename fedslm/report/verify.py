"""``fedslm verify``: recompute a report (or a run) from the run's own files.

Given a run folder, every check of ``fedslm.report.checks`` runs over every site, then every
report found in the folder (``report.json``, ``sites/SITE/report.json``) is verified. Given a
``report.json``, its run is found (the folder it sits in, else the run folder it names), the
checks run over the report's sites, and the report is verified:

1. it parses and matches the report schema (else: unreadable input, exit 2);
2. a site's report sits in that site's folder (a report copied over another site's fails);
3. it equals the report rebuilt from the run now, field by field (every epsilon recomputed,
   every other figure re-read), except when it was generated and where the run was;
4. ``report.html`` beside it is exactly what ``report.json`` renders to (when made by the same
   fedslm and matplotlib versions; otherwise this step is skipped and said so).

Each site's report must also carry that site's signature, checked against the public key
the *auditor* supplies for the site (``--keys``), never against a key read from the run: a key
stored beside what it signs proves nothing to someone who can rewrite both. A report that is
not signed by a key the auditor holds is UNSIGNED: the figures may all check out, but nobody
vouches for them.

The outcome is the first discrepancy (exit 1), naming file, site, field, stored and
recomputed values; else, when some site's report carried no signature checked against the
auditor's keys, UNSIGNED (exit 3, or 0 when the auditor accepts that with
``allow_unsigned``); else one line saying what was checked and against which keys (exit 0).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedslm.report import REPORT_HTML, REPORT_JSON, checks
from fedslm.report.build import collect
from fedslm.report.checks import first_failure
from fedslm.report.checks.base import Discrepancy
from fedslm.report.model import VOLATILE_FIELDS, Report
from fedslm.report.render import render_html
from fedslm.report.runfiles import PRIVACY_FILE, ReportInputError, RunContext, load_run
from fedslm.report.signing import TrustedKey, check_site_signature

# A re-read float equals the stored one; accountants run threaded FFTs whose last bits can
# depend on the thread count, so allow far less than any edit but more than rounding.
_REL = 1e-9
# exit code of a run or report whose figures check out but that no site key vouches for
UNSIGNED = 3


@dataclass
class Outcome:
    """What verify found: ``code`` 0 (all well), 1 (a discrepancy) or 2 (unreadable input)."""

    code: int
    message: str
    checked: list[str] = field(default_factory=list)


@dataclass
class Signatures:
    """The keys the auditor supplied, and which sites' reports were checked against them."""

    trusted: Mapping[str, TrustedKey]
    signed: dict[str, TrustedKey] = field(default_factory=dict)
    unsigned: dict[str, str] = field(default_factory=dict)  # site -> why it was not checked

    def not_checked(self, site: str, why: str) -> None:
        """Record that ``site``'s report carried no signature checked against a key."""
        if site not in self.signed:
            self.unsigned.setdefault(site, why)


def verify_path(
    path: str | Path,
    trusted: Mapping[str, TrustedKey] | None = None,
    allow_unsigned: bool = False,
) -> Outcome:
    """Verify a run folder or one ``report.json``; never raises for bad input.

    ``trusted`` holds the sites' public keys as the auditor supplied them (by site name);
    site signatures are checked against these only. With a site's report unsigned by such a
    key the outcome is UNSIGNED (exit 3) unless ``allow_unsigned``.
    """
    path = Path(path)
    sigs = Signatures(dict(trusted or {}))
    try:
        if path.is_dir():
            return _verify_run(path, sigs, allow_unsigned)
        if path.is_file():
            return _verify_report_file(path, sigs, allow_unsigned)
        raise ReportInputError(f"{path}: no such file or folder")
    except ReportInputError as exc:
        return Outcome(2, f"error: {exc}")


def _verify_run(root: Path, sigs: Signatures, allow_unsigned: bool) -> Outcome:
    ctx = RunContext(load_run(root))
    sites = ctx.site_names()
    inconclusive: list[str] = []
    failed = first_failure(ctx, sites, inconclusive)
    if failed is not None:
        return _fail(failed[0], failed[1])
    reports = [root / REPORT_JSON, *sorted((root / "sites").glob(f"*/{REPORT_JSON}"))]
    checked, skipped = [], list(inconclusive)
    for report_path in [p for p in reports if p.is_file()]:
        expected = report_path.parent.name if report_path.parent != root else None
        found, note = _verify_report(ctx, report_path, expected, root, sigs=sigs)
        if found is not None:
            return _fail("report", found)
        checked.append(str(report_path.relative_to(root)))
        skipped += [note] if note else []
    for site in sites:
        sigs.not_checked(site, f"no sites/{site}/{REPORT_JSON} (run `fedslm report`)")
    if ctx.run.incomplete:
        skipped.insert(0, ctx.run.incomplete)
    what = (
        f"{len(checked)} report(s) match the run ({', '.join(checked)})"
        if checked
        else "no report.json in the folder (run `fedslm report` to write one)"
    )
    passed = _passed(ctx, inconclusive)
    return _ok(root, sites, what, skipped, sigs, allow_unsigned, passed)


def _verify_report_file(report_path: Path, sigs: Signatures, allow_unsigned: bool) -> Outcome:
    stored = _read_report(report_path)
    folder = report_path.parent
    expected = folder.name if folder.parent.name == "sites" else None
    if (folder / PRIVACY_FILE).is_file():
        root = folder
    elif expected and (folder.parent.parent / PRIVACY_FILE).is_file():
        root = folder.parent.parent
    else:
        root = Path(stored.run.run_dir)
    ctx = RunContext(load_run(root))
    sites = [stored.scope.site] if stored.scope.site else ctx.site_names()
    if stored.scope.site and stored.scope.site not in ctx.site_names():
        outside = Discrepancy(
            str(report_path),
            None,
            "scope.site",
            stored.scope.site,
            ctx.site_names(),
            expected_label="the run's sites are",
        )
        return _fail("report", outside)
    inconclusive: list[str] = []
    failed = first_failure(ctx, sites, inconclusive)
    if failed is not None:
        return _fail(failed[0], failed[1])
    found, note = _verify_report(ctx, report_path, expected, root, stored, sigs)
    if found is not None:
        return _fail("report", found)
    notes = [*inconclusive, *([note] if note else [])]
    if stored.scope.site is None:
        # the federation's report is the coordinator's and carries no site's signature: the
        # sites vouch for it through their own reports beside it, verified here as well
        for site in sites:
            part = folder / "sites" / site / REPORT_JSON
            if not part.is_file():
                sigs.not_checked(site, f"no sites/{site}/{REPORT_JSON} beside {report_path}")
                continue
            found, note = _verify_report(ctx, part, site, root, sigs=sigs)
            if found is not None:
                return _fail("report", found)
            notes += [note] if note else []
    passed = _passed(ctx, inconclusive)
    return _ok(root, sites, f"{report_path} matches the run", notes, sigs, allow_unsigned, passed)


def _read_report(path: Path) -> Report:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from None
    try:
        return Report.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ReportInputError(
            f"{path}: not a fedslm report of schema version 1: {where}: {err['msg']}"
        ) from None


def _verify_report(
    ctx: RunContext,
    report_path: Path,
    expected_site: str | None,
    root: Path,
    stored: Report | None = None,
    sigs: Signatures | None = None,
) -> tuple[Discrepancy | None, str | None]:
    """The first discrepancy between a stored report and its run (or None), and a note about
    anything skipped. A site's report is checked against the auditor's key for the site in
    ``sigs``, which records whether it was."""
    stored = stored or _read_report(report_path)
    shown = _shown(report_path, root)
    if expected_site is not None and stored.scope.site != expected_site:
        return Discrepancy(
            shown,
            expected_site,
            "scope.site",
            stored.scope.site,
            expected_site,
            note="a site's report must be that site's, in that site's folder",
            expected_label="folder is for",
        ), None
    if expected_site is None and stored.scope.level != "federation":
        return Discrepancy(
            shown,
            stored.scope.site,
            "scope.level",
            stored.scope.level,
            "federation",
            expected_label="folder holds the report of the",
        ), None
    known = {c.name for c in checks.CHECKS}  # the module's list: checks can be registered
    unknown = [c.name for c in stored.checks if c.name not in known]
    if unknown:
        return Discrepancy(
            shown,
            stored.scope.site,
            "checks",
            unknown,
            sorted(known),
            note="the report was made by a fedslm with checks this one does not have; "
            "verify it with that version",
            expected_label="this fedslm knows",
        ), None
    # Checks added since the report was made have already run over the run's files above;
    # the report itself is rebuilt with the checks it was made with.
    baselines = [(b.name, Path(b.path)) for b in stored.utility.baselines]
    rebuilt = collect(
        root,
        site=stored.scope.site,
        baselines=baselines,
        ctx=ctx,
        generated_at=stored.generated_at,
        check_names=[c.name for c in stored.checks],
    )
    found = first_difference(
        stored.model_dump(mode="json"), rebuilt.model_dump(mode="json"), shown, stored.scope.site
    )
    if found is not None:
        return found, None
    site = stored.scope.site
    if site is not None and sigs is not None:
        trusted = sigs.trusted.get(site)
        if trusted is None:
            sigs.not_checked(site, "you gave no key for this site (--keys)")
        else:
            found = check_site_signature(site, report_path, trusted, shown)
            if found is not None:
                return found, None
            sigs.signed[site] = trusted
    return _check_html(report_path, stored, rebuilt, root)


def _check_html(
    report_path: Path, stored: Report, rebuilt: Report, root: Path
) -> tuple[Discrepancy | None, str | None]:
    html_path = report_path.with_name(REPORT_HTML)
    if not html_path.is_file():
        return None, f"{_shown(html_path, root)} absent"
    if stored.fingerprints.report_software != rebuilt.fingerprints.report_software:
        return None, (
            f"{_shown(html_path, root)} not re-rendered: made with "
            f"{stored.fingerprints.report_software}, this is {rebuilt.fingerprints.report_software}"
        )
    shown = _shown(html_path, root)
    return html_edited(html_path, render_html(stored), shown, stored.scope.site), None


def html_edited(html_path: Path, fresh: str, shown: str, site: str | None) -> Discrepancy | None:
    """The page at ``html_path`` differs from ``fresh``, what its report.json renders to: it
    was edited (``shown``: the path as the message names it). None if equal or absent."""
    if not html_path.is_file():
        return None
    on_disk, rendered = html_path.read_bytes(), fresh.encode("utf-8")
    if on_disk == rendered:
        return None
    return Discrepancy(
        shown,
        site,
        "content (sha256)",
        hashlib.sha256(on_disk).hexdigest(),
        hashlib.sha256(rendered).hexdigest(),
        note=f"the page differs from what {REPORT_JSON} renders to: it was edited",
        expected_label="rendering of report.json has",
    )


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def first_difference(
    stored: Any, rebuilt: Any, file: str, site: str | None, where: str = ""
) -> Discrepancy | None:
    """Walk both JSON trees in order; the first field that differs (volatile ones skipped),
    reported against ``file`` and the ``site`` the report is of (None: the federation's)."""
    if isinstance(stored, dict) and isinstance(rebuilt, dict):
        for key in list(dict.fromkeys([*stored, *rebuilt])):
            if key in VOLATILE_FIELDS or key in ("report_software", "generated_by"):
                continue  # when and where it was made, and with what, may differ
            if key not in stored or key not in rebuilt:
                return Discrepancy(file, site, _join(where, key), stored.get(key), rebuilt.get(key))
            found = first_difference(stored[key], rebuilt[key], file, site, _join(where, key))
            if found:
                return found
        return None
    if isinstance(stored, list) and isinstance(rebuilt, list):
        for i, (a, b) in enumerate(zip(stored, rebuilt, strict=False)):
            found = first_difference(a, b, file, site, f"{where}[{_label(a, i)}]")
            if found:
                return found
        if len(stored) != len(rebuilt):
            return Discrepancy(file, site, f"{where} (count)", len(stored), len(rebuilt))
        return None
    if _equal(stored, rebuilt):
        return None
    return Discrepancy(file, site, where, stored, rebuilt)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _label(item: Any, index: int) -> str:
    if isinstance(item, dict):
        for key in ("site", "name", "round"):
            if isinstance(item.get(key), str | int) and not isinstance(item.get(key), bool):
                return str(item[key])
    return str(index)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=_REL, abs_tol=0.0)
    return a == b


def _fail(check: str, found: Discrepancy) -> Outcome:
    return Outcome(1, f"verify FAILED ({check}): {found}")


def _passed(ctx: RunContext, inconclusive: list[str]) -> int:
    """How many checks ran on the run and passed (not those that do not apply to it)."""
    return sum(c.applicable(ctx) for c in checks.CHECKS) - len(inconclusive)


def _ok(
    root: Path,
    sites: list[str],
    what: str,
    notes: list[str],
    sigs: Signatures,
    allow_unsigned: bool,
    passed: int,
) -> Outcome:
    extra = f"; {'; '.join(notes)}" if notes else ""
    figures = (
        f"{root}: {passed} checks passed for {len(sites)} site(s) "
        f"({', '.join(sites)}), epsilons recomputed (PLD, exact closed form); {what}{extra}"
    )
    signed = ", ".join(sigs.signed)
    if not sigs.unsigned:
        return Outcome(0, f"verify OK: {figures}; signatures of {signed} checked against your keys")
    missing = "; ".join(f"{site}: {why}" for site, why in sigs.unsigned.items())
    if not sigs.trusted:
        missing = f"{', '.join(sigs.unsigned)} (no --keys given)"
    elif not sigs.signed:
        missing += f" (your keys name {', '.join(sorted(sigs.trusted))})"
    if allow_unsigned:
        also = f"; signatures of {signed} checked against your keys" if signed else ""
        return Outcome(
            0,
            f"verify OK (UNSIGNED, accepted with --allow-unsigned): {figures}; no signature "
            f"checked for {missing}{also}",
        )
    return Outcome(
        UNSIGNED,
        f"verify UNSIGNED: {figures}; but no signature was checked for {missing}. Whoever can "
        "write the run folder could have made these figures; give the sites' public keys "
        "with --keys (SITE.pub files, SITE/site.pub folders or the coordinator's sites.json), "
        "or accept an unsigned report with --allow-unsigned",
    )
