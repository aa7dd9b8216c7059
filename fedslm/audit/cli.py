"""``fedslm audit CONFIG``: the empirical privacy audit of a simulated job (``run.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedslm.audit import (
    DEFAULT_CANARIES,
    EXIT_NO_POWER,
    EXIT_VIOLATION,
    MIN_CONTROL_EPSILON,
)
from fedslm.cli import add_overrides


def audit_cmd(args: argparse.Namespace) -> int:
    """Run the audit; exit 0 passed, 1 the lower bound exceeds the claimed epsilon, 3 the
    control had no power (inconclusive); input errors raise ``FedSLMError`` (exit 2)."""
    from fedslm.audit.run import run_audit
    from fedslm.progress import Reporter

    out: Path = args.out or Path("runs") / f"{args.config.stem}-audit"
    result = run_audit(
        args.config,
        out,
        overrides=args.overrides,
        canaries=args.canaries,
        site=args.site,
        guesses=args.guesses,
        seed=args.seed,
        min_control_epsilon=args.min_control_epsilon,
        overwrite=args.overwrite,
        allow_site_data=args.allow_site_data,
        reporter=Reporter(quiet=args.quiet),
    )
    for arm in (result.audited, result.control):
        b = arm.bound
        formal = (
            f"formal epsilon {arm.formal_epsilon:.3f} ({arm.accountant}, delta {arm.delta:g})"
            if arm.formal_epsilon is not None
            else "DP off"
        )
        print(
            f"{arm.name}: lower bound {b.epsilon:.3f} at {1 - b.level:.0%} confidence "
            f"(m={result.canaries}, r={b.guesses}, v={b.correct}); {formal}"
        )
    print(f"written: {out}/audit.json, audit.md (canaries and inclusion bits: canaries.json)")
    code = result.exit_code
    stream = sys.stderr if code in (EXIT_VIOLATION, EXIT_NO_POWER) else sys.stdout
    print(f"audit: {result.verdict}", file=stream)
    return code


def add_cli(subparsers: Any) -> None:
    """Register ``audit`` on the CLI's sub-parsers (handler in ``set_defaults``)."""
    p = subparsers.add_parser(
        "audit",
        help="empirical lower bound on epsilon from one run with canaries, with a DP-off "
        "control (simulation only)",
    )
    p.add_argument("config", type=Path, help="YAML job config (simulated data)")
    p.add_argument("--out", type=Path, help="audit folder (default: runs/<config name>-audit)")
    add_overrides(p)
    p.add_argument(
        "--canaries",
        type=int,
        default=DEFAULT_CANARIES,
        metavar="M",
        help=f"canaries, each included with probability 1/2 (default {DEFAULT_CANARIES})",
    )
    p.add_argument("--site", help="the site whose training data gets the canaries (default: first)")
    p.add_argument(
        "--guesses",
        type=int,
        action="append",
        metavar="R",
        help="a number of member guesses to test (repeatable; default 5%%, 10%%, 20%%, 50%% "
        "of M); the 5%% error level is split among them",
    )
    p.add_argument("--seed", type=int, help="seed of the canaries (default: the job's seed)")
    p.add_argument(
        "--min-control-epsilon",
        type=float,
        default=MIN_CONTROL_EPSILON,
        help="the DP-off control must reach this lower bound, else the audit had no power "
        f"(default {MIN_CONTROL_EPSILON})",
    )
    p.add_argument(
        "--allow-site-data",
        action="store_true",
        help="audit data files outside the config's folder and the temporary folder (never "
        "a real site's data: canaries would be trained into it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier audit folder")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.set_defaults(handler=audit_cmd)
