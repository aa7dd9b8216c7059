"""``fedslm report RUN`` and ``fedslm verify REPORT_OR_RUN``: what a privacy officer runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def report_cmd(args: argparse.Namespace) -> int:
    """Write the reports; exit 0 when every check passed, 1 when one failed (the reports are
    written either way and say which). Unreadable input raises ``ReportInputError`` (exit 2)."""
    from fedslm.report import ReportInputError, write_reports
    from fedslm.report.federation import is_deployed_run

    if is_deployed_run(Path(args.run)):
        raise ReportInputError(
            f"{args.run}: a deployed run: its sites' ledgers are at the sites. Each site writes "
            "its signed report (`fedslm site report --policy site.yaml --job JOB_ID`); the "
            "coordinator files them (`fedslm coordinator add-report`) and writes the federation "
            "report with `fedslm coordinator report RUN --config coordinator.yaml`"
        )
    written = write_reports(args.run, args.out, args.baseline)
    for w in written:
        print(f"{w.scope}: {w.html_path} and {w.json_path.name}")
    federation = written[0].report.summary
    incomplete = written[0].report.run.incomplete
    if incomplete:
        print(f"report: {incomplete}", file=sys.stderr)
    if federation.checks_passed:
        print(f"report: {federation.checks_line}")
        return 0
    print(f"report: {federation.checks_line}", file=sys.stderr)
    return 1


def verify_cmd(args: argparse.Namespace) -> int:
    """Verify a run folder or a report.json; exit 0 ok, 1 first discrepancy, 2 unreadable,
    3 unsigned (no site signature checked against the auditor's ``--keys``; 0 with
    ``--allow-unsigned``)."""
    from fedslm.errors import FedSLMError
    from fedslm.report.signing import load_trusted_keys
    from fedslm.report.verify import verify_path

    try:
        trusted = load_trusted_keys(getattr(args, "keys", None) or [])
    except FedSLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # say what the signatures will be checked against before anything else
    if trusted:
        print("keys: " + "; ".join(str(k) for k in trusted.values()))
    else:
        print("keys: none given (--keys): site signatures cannot be checked")
    from fedslm.report.deployed_cli import verify_deployed

    allow = getattr(args, "allow_unsigned", False)
    outcome = verify_deployed(
        args.path, trusted, allow, getattr(args, "policy", None),
        getattr(args, "coordinator_key", None),
    ) or verify_path(args.path, trusted, allow)  # fmt: skip
    print(outcome.message, file=sys.stdout if outcome.code == 0 else sys.stderr)
    return outcome.code


def add_cli(subparsers: Any) -> None:
    """Register ``report`` and ``verify`` on the CLI's sub-parsers.

    Each parser stores its handler with ``set_defaults(handler=...)``; the handler takes the
    parsed ``argparse.Namespace`` and returns the exit code. ``report`` raises
    ``ReportInputError`` (a ``FedSLMError``) for an unreadable run; ``verify`` reports it
    itself and returns 2.
    """
    report = subparsers.add_parser(
        "report",
        help="write report.html and report.json for a run, for the federation and each site",
    )
    report.add_argument("run", type=Path, help="run folder (fedslm simulate or centralized)")
    report.add_argument(
        "--out", type=Path, help="write the reports here instead of into the run folder"
    )
    report.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="another run to compare utility against (repeatable); RUN/baselines/*/ is "
        "picked up as well",
    )
    report.set_defaults(handler=report_cmd)
    verify = subparsers.add_parser(
        "verify",
        help="recompute a report or a run from the run's files and check each site's "
        "signature against your keys (exit 1 at the first discrepancy, 2 for unreadable "
        "input, 3 when a site's report is not signed by a key you gave)",
    )
    verify.add_argument(
        "path", type=Path, help="a run folder (simulated or deployed) or a report.json"
    )
    verify.add_argument(
        "--keys",
        type=Path,
        action="append",
        default=[],
        metavar="DIR_OR_FILE",
        help="the sites' public keys, from you, not from the run: a coordinator's sites.json, "
        "SITE.pub files, or a folder of them or of SITE/site.pub (repeatable)",
    )
    verify.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="exit 0 even when a site's report carries no signature checked against --keys",
    )
    verify.add_argument(
        "--policy",
        type=Path,
        help="at a deployed site: the site's policy, to recompute its report from its ledger",
    )
    verify.add_argument(
        "--coordinator-key",
        type=Path,
        metavar="REPORT_PUB",
        help="the coordinator's report.pub, to check a governance summary's signature",
    )
    verify.set_defaults(handler=verify_cmd)
