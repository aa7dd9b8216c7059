"""``fedslm ledger show|verify LEDGER``: what a site operator or auditor runs on a ledger file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedslm.privacy import accounting
from fedslm.privacy.anchors import check_ledger_anchors, read_anchors, read_journal
from fedslm.privacy.egress_log import egress_entries, verify_egress
from fedslm.privacy.ledger import (
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    format_time,
    journal_path,
)


def show_text(path: str | Path, budget: float | None = None) -> str:
    """Human-readable summary: per data set its entries, jobs, steps, and spend vs budget.

    Spend is recomputed from the segments (one line per delta and accountant used on that data
    set). A broken chain is reported at the top instead of failing, so an operator can still
    see what is in the file. Raises ``LedgerError`` if the file cannot be read.
    """
    with PrivacyLedger(path, create=False) as ledger:
        entries, problems = ledger._snapshot()
        bound = ledger.bound_dataset
        messages = egress_entries(ledger)
    lines = [f"privacy ledger {path}: {_plural(len(entries), 'entry', 'entries')}"]
    lines.append(f"  bound to data set {bound}" if bound else "  not bound to one data set")
    if problems:
        lines.append(
            f"  WARNING: integrity check failed: {problems[0]}. Figures below are from the file "
            "as it is; run `fedslm ledger verify`."
        )
    else:
        lines.append("  hash chain intact (`fedslm ledger verify` also recomputes epsilons)")
    by_ds: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        by_ds.setdefault(e.dataset, []).append(e)
    for key, ds_entries in by_ds.items():
        lines.append("")
        lines.append(f"data set {key}")
        try:
            lines.extend(_show_dataset(ds_entries, budget))
        except (ValueError, TypeError) as exc:  # values a tamperer wrote; verify names them
            lines.append(f"  cannot compute the spend from these entries: {exc}")
    if not by_ds:
        lines.append("  (no entries)")
    sent = [m for m in messages if m.status == "sent"]
    blocked = [m for m in messages if m.status == "blocked"]
    lines.append("")
    lines.append(
        f"egress log: {len(sent)} message(s) sent, "
        f"{sum(int(m.record.get('tensor_bytes', 0)) for m in sent):,} bytes of tensors; "
        f"{len(blocked)} blocked"
    )
    for m in blocked:
        reasons = "; ".join(m.record.get("blocked_because", []))
        lines.append(f"  BLOCKED job {m.job_id} round {m.round} {m.kind}: {reasons}")
    return "\n".join(lines)


def _show_dataset(ds_entries: list[LedgerEntry], budget: float | None) -> list[str]:
    lines: list[str] = []
    segs = [e.segment for e in ds_entries]
    jobs = sorted({e.job_id for e in ds_entries})
    lines.append(
        f"  {_plural(len(ds_entries), 'entry', 'entries')}, "
        f"{_plural(len(jobs), 'job', 'jobs')} ({', '.join(jobs)}), "
        f"{sum(s.steps for s in segs)} steps; last at {format_time(ds_entries[-1].time)}"
    )
    readings = sorted({(e.delta, e.accountant) for e in ds_entries}, reverse=True)
    for delta, acc in readings:
        eps = accounting.epsilon(segs, delta, acc)
        line = f"  spent epsilon {eps:.4f} at delta {delta:g} ({acc})"
        if budget is not None:
            left = budget - eps
            state = "EXHAUSTED" if left <= 0 else f"left {left:.4f}"
            line += f"; budget {budget:g}: {state}"
        lines.append(line)
    return lines


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def verify_file(
    path: str | Path, anchors: Sequence[str | Path] = (), site: str | None = None
) -> int:
    """Verify a ledger file and print the outcome. Exit code: 0 ok, 1 discrepancy, 2 unreadable.

    Besides its own chains, the ledger must extend every head in its journal and in
    ``anchors`` (run folders, privacy.json, report.json or journals; ``site`` picks the site's
    heads in a run of several): a ledger rewritten with every later hash recomputed passes the
    chain check but not this one.
    """
    try:
        released = [a for p in anchors for a in read_anchors(p, site)]
        with PrivacyLedger(path, create=False) as ledger:
            problems = ledger.verify() or verify_egress(ledger)
            if not problems:
                found = check_ledger_anchors(ledger, released)
                problems = [found.describe()] if found else []
            count = len(ledger.entries())
            messages = len(egress_entries(ledger))
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        print(f"ledger {path}: verification FAILED: {problems[0]}", file=sys.stderr)
        return 1
    journal = journal_path(Path(path))
    heads = len(released) + len(read_journal(journal))
    print(
        f"ledger {path}: OK, {_plural(count, 'entry', 'entries')} and "
        f"{_plural(messages, 'egress record', 'egress records')}, hash chains intact, every "
        "epsilon recomputed "
        f"(the stored accountant and pld, each within {accounting.EPSILON_TOLERANCE:.0%}), "
        f"extends {_plural(heads, 'anchored head', 'anchored heads')} (--anchor and {journal})"
    )
    return 0


def _show_cmd(args: argparse.Namespace) -> int:
    print(show_text(args.ledger, args.budget))
    return 0


def _verify_cmd(args: argparse.Namespace) -> int:
    return verify_file(args.ledger, args.anchor, args.site)


def add_cli(subparsers: Any) -> None:
    """Register ``ledger show`` and ``ledger verify`` on the CLI's sub-parsers.

    Each leaf parser stores its handler with ``set_defaults(handler=...)``; the handler takes
    the parsed ``argparse.Namespace`` and returns the exit code. ``show`` raises
    ``LedgerError`` (a ``FedSLMError``) for an unreadable file; ``verify`` reports it itself
    and returns 2.
    """
    ledger = subparsers.add_parser("ledger", help="show or verify a site's privacy ledger")
    sub = ledger.add_subparsers(dest="ledger_command", required=True)
    show = sub.add_parser("show", help="spend and budget per data set")
    show.add_argument("ledger", type=Path, help="ledger file (SQLite)")
    show.add_argument(
        "--budget", type=float, metavar="EPS", help="policy epsilon budget to compare against"
    )
    show.set_defaults(handler=_show_cmd)
    verify = sub.add_parser(
        "verify",
        help="check the hash chain, recompute every epsilon and check the ledger extends every "
        "anchored head (its journal, --anchor); exit 1 on mismatch",
    )
    verify.add_argument("ledger", type=Path, help="ledger file (SQLite)")
    verify.add_argument(
        "--anchor",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a run folder, privacy.json, report.json or journal holding heads the site "
        "released; the ledger must still extend them (repeatable; its journal is always read)",
    )
    verify.add_argument("--site", help="the site's name in the --anchor runs")
    verify.set_defaults(handler=_verify_cmd)
