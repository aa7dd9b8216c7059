"""Reports of deployed runs on the command line: ``fedslm site report``, ``fedslm coordinator
add-report`` and ``report``, and what ``fedslm verify`` does with their files."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedslm.report.signing import TrustedKey
from fedslm.report.verify import UNSIGNED, Outcome


def site_report_cmd(args: argparse.Namespace) -> int:
    """``fedslm site report``: 0 when every check passed, 1 otherwise (written either way)."""
    from fedslm.report.site_report import write_site_report

    report, folder = write_site_report(args.policy, args.job, args.out)
    print(
        f"site {report.site}: {folder / 'report.html'}, report.json and report.sig (signed "
        "with daemon.key)"
    )
    for line in report.summary:
        print(f"  {line}")
    if args.job:
        print(
            f"read it, then hand the folder {folder} to the coordinator operator "
            "(`fedslm coordinator add-report RUN FOLDER`)"
        )
    failed = [c for c in report.checks if not c.passed]
    return 1 if failed else 0


def add_site_report_cli(site_sub: Any) -> None:
    """Register ``fedslm site report`` on the ``site`` command's sub-parsers."""
    p = site_sub.add_parser(
        "report",
        help="write this site's signed privacy report (report.html, report.json, report.sig) "
        "from its policy, ledger and egress log (deployment)",
    )
    p.add_argument(
        "--policy",
        type=Path,
        required=True,
        help="the site's policy file, with a daemon section (name, key)",
    )
    p.add_argument(
        "--job",
        metavar="JOB_ID",
        help="the job to show messages and refusals for (job.json's job_id on the "
        "coordinator); default: every job",
    )
    p.add_argument(
        "--out", type=Path, help="folder to write to (default: daemon.state_dir/reports/JOB_ID)"
    )
    p.set_defaults(handler=site_report_cmd)


def coordinator_report(settings: Any, run: str) -> int:
    """``fedslm coordinator report RUN``: the federation report and the governance summary;
    0 when every check passed, 1 otherwise."""
    from fedslm.deployment.coordinator import Paths, run_folder
    from fedslm.report.federation import REPORT_PUB, write_deployed_reports
    from fedslm.report.signing import load_trusted_keys

    state = Path(settings.state)
    folder = run_folder(settings, run)
    registry = Paths(state).sites
    trusted = load_trusted_keys([registry]) if registry.is_file() else {}
    full, summary = write_deployed_reports(folder, trusted, state)
    print(f"federation report: {folder / 'report.html'} and report.json")
    print(
        f"governance summary: {folder / 'governance' / 'report.html'}, report.json and "
        f"report.sig (signed with {state / 'report.key'}; give readers {state / REPORT_PUB})"
    )
    for line in full.summary:
        print(f"  {line}")
    print(f"  governance pseudonyms: {', '.join(o.site for o in summary.sites)}")
    return 0 if all(c.passed for c in full.checks) else 1


def coordinator_add_report(settings: Any, run: str, folder: Path) -> int:
    """``fedslm coordinator add-report RUN FOLDER``: file a site's handed-over report."""
    from fedslm.deployment.coordinator import Paths, run_folder
    from fedslm.report.federation import add_site_report
    from fedslm.report.signing import load_trusted_keys

    registry = Paths(Path(settings.state)).sites
    trusted = load_trusted_keys([registry]) if registry.is_file() else {}
    site, dest = add_site_report(run_folder(settings, run), folder, trusted)
    print(
        f"site {site}: report accepted (signature verified with its registered key "
        f"{trusted[site].fingerprint}); kept in {dest}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# verify


def _format(path: Path) -> str | None:
    """The ``format`` of a report.json, or None when it is not one of the deployed kinds."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def verify_deployed(
    path: Path,
    trusted: Mapping[str, TrustedKey],
    allow_unsigned: bool,
    policy: Path | None = None,
    coordinator_key: Path | None = None,
) -> Outcome | None:
    """Verify a deployed site's report, a deployed run (folder or report.json) or a governance
    summary; None when ``path`` is none of these (the run-folder verify takes it)."""
    from fedslm.errors import FedSLMError
    from fedslm.report.federation import DEPLOYED_FORMAT, is_deployed_run
    from fedslm.report.site_report import SITE_FORMAT

    path = Path(path)
    if path.is_dir() and is_deployed_run(path):
        path = path / "report.json"
        if not path.is_file():
            return Outcome(2, f"error: {path}: no report (run `fedslm coordinator report`)")
    if not path.is_file():
        return None
    kind = _format(path)
    try:
        if kind == SITE_FORMAT:
            return _verify_site(path, trusted, allow_unsigned, policy)
        if kind == DEPLOYED_FORMAT:
            return _verify_federation(path, trusted, allow_unsigned, coordinator_key)
    except FedSLMError as exc:
        return Outcome(2, f"error: {exc}")
    return None


def _verify_site(
    path: Path, trusted: Mapping[str, TrustedKey], allow_unsigned: bool, policy: Path | None
) -> Outcome:
    from fedslm.keys import load_private_key
    from fedslm.report.signing import check_site_signature
    from fedslm.report.site_report import (
        read_site_report,
        site_policy,
        site_report_discrepancy,
    )

    if policy is None:
        return Outcome(
            2,
            f"error: {path}: a site's report is recomputed from the site's own "
            "ledger: run verify at the site with --policy site.yaml",
        )
    stored = read_site_report(path)
    found = site_report_discrepancy(path, stored, policy)
    if found is not None:
        return Outcome(1, f"verify FAILED (site report): {found}")
    failed = _failed_check(stored.checks, f"{path}, site {stored.site}")
    if failed is not None:
        return failed
    key = trusted.get(stored.site)
    if key is None:
        # at the site, the site's own key is the one it holds: its public half is the truth
        pol, _, _ = site_policy(policy)
        assert pol.daemon is not None
        private = load_private_key(Path(pol.daemon.key))
        key = TrustedKey(stored.site, private.public_key(), f"daemon.key of {policy}")
    found = check_site_signature(stored.site, path, key, str(path))
    if found is not None:
        return Outcome(1, f"verify FAILED (site report): {found}")
    return Outcome(
        0,
        f"verify OK: {path}: site {stored.site}'s report recomputes from its "
        f"ledger up to entry {stored.ledger.entries_seq} and egress record "
        f"{stored.ledger.egress_seq}, {len(stored.checks)} checks as stated; "
        f"signature checked against {key}",
    )


def _verify_federation(
    path: Path,
    trusted: Mapping[str, TrustedKey],
    allow_unsigned: bool,
    coordinator_key: Path | None,
) -> Outcome:
    from fedslm.report.federation import (
        full_report_discrepancy,
        read_deployed_report,
    )

    stored = read_deployed_report(path)
    if stored.variant == "governance":
        return _verify_governance(path, stored, allow_unsigned, coordinator_key)
    found, checked, unchecked = full_report_discrepancy(path, stored, trusted)
    if found is not None:
        return Outcome(1, f"verify FAILED (deployed run): {found}")
    failed = _failed_check(stored.checks, str(path))
    if failed is not None:
        return failed
    what = (
        f"verify OK: {path}: the federation report of deployed run {stored.run.run} "
        "recomputes from the run folder and the site reports; "
    )
    missing = [o.site for o in stored.sites if not o.report_received]
    said = f"no report received from {', '.join(missing)}; " if missing else ""
    if unchecked or not trusted:
        return _unsigned(
            f"{what}{said}no key given for {', '.join(unchecked) or 'any site'} (--keys: "
            "the coordinator's sites.json or the sites' site.pub)",
            allow_unsigned,
        )
    return Outcome(
        0, f"{what}{said}signatures of {', '.join(checked) or 'no site'} checked against your keys"
    )


def _unsigned(text: str, allow_unsigned: bool) -> Outcome:
    """``text`` (a "verify OK" line) for figures that recompute but whose signatures were not
    checked: accepted only with ``--allow-unsigned``, otherwise the UNSIGNED exit code."""
    if allow_unsigned:
        return Outcome(0, text.replace("verify OK", "verify OK (UNSIGNED, accepted)", 1))
    return Outcome(UNSIGNED, text.replace("verify OK", "verify UNSIGNED", 1))


def _failed_check(checks: list[Any], where: str) -> Outcome | None:
    """A report that recomputes exactly but states a failed check still fails: the figures
    are right, and what they show is wrong."""
    failed = next((c for c in checks if not c.passed), None)
    if failed is None:
        return None
    return Outcome(1, f"verify FAILED ({failed.name}): {where}: {failed.detail}")


def _verify_governance(
    path: Path, stored: Any, allow_unsigned: bool, coordinator_key: Path | None
) -> Outcome:
    from fedslm.report.federation import COORDINATOR, governance_discrepancy
    from fedslm.report.signing import check_site_signature, load_trusted_keys

    found = governance_discrepancy(path, stored)
    if found is not None:
        return Outcome(1, f"verify FAILED (governance summary): {found}")
    failed = _failed_check(stored.checks, str(path))
    if failed is not None:
        return failed
    what = (
        f"verify OK: {path}: governance summary of run {stored.run.run}: every epsilon, "
        "remaining budget, count and check recomputes from its own figures"
    )
    if coordinator_key is None:
        return _unsigned(
            f"{what}; the coordinator's signature was not checked (--coordinator-key)",
            allow_unsigned,
        )
    keys = list(load_trusted_keys([coordinator_key]).values())
    if len(keys) != 1:
        return Outcome(2, f"error: --coordinator-key {coordinator_key}: expected one key")
    key = keys[0]
    found = check_site_signature(COORDINATOR, path, key, str(path))
    if found is not None:
        return Outcome(1, f"verify FAILED (governance summary): {found}")
    return Outcome(0, f"{what}; coordinator signature checked against {key}")
