"""The empirical privacy audit's power and cost on the shipped jobs (docs/benchmarks.md 13).

For each config: ``fedslm audit`` (the library call behind it) with ``--canaries M``: the
DP-off control's lower bound (the audit's power: how far a run with no protection can be
caught with M canaries), the DP run's lower bound next to its formal epsilon, and the wall
time of each of the two trainings. Run niced, once; the machine is shared.

    python -m bench.audit [--canaries 200] [--config configs/smoke.yaml ...]
                          [--set KEY=VALUE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import REPO, machine, table, write_json
from fedslm.audit.run import run_audit

CONFIGS = [REPO / "configs" / "smoke.yaml", REPO / "configs" / "demo.yaml"]


def audit_one(config: Path, canaries: int, overrides: list[str], workdir: Path) -> dict:
    """One audit of ``config``; its figures."""
    start = time.perf_counter()
    result = run_audit(config, workdir / config.stem, overrides=overrides, canaries=canaries)
    a, c = result.audited, result.control
    return {
        "config": config.name,
        "overrides": overrides,
        "canaries": canaries,
        "included": result.included,
        "dp_bound": a.bound.epsilon,
        "dp_r": a.bound.guesses,
        "dp_v": a.bound.correct,
        "formal_epsilon": a.formal_epsilon,
        "accountant": a.accountant,
        "control_bound": c.bound.epsilon,
        "control_r": c.bound.guesses,
        "control_v": c.bound.correct,
        "dp_seconds": a.seconds,
        "control_seconds": c.seconds,
        "total_seconds": time.perf_counter() - start,
        "verdict": result.verdict,
        "exit_code": result.exit_code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--config", type=Path, action="append", help="default: smoke and demo")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override applied to every config (e.g. federation.rounds=1)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedslm-bench-audit-") as tmp:
        for config in args.config or CONFIGS:
            rows.append(audit_one(config, args.canaries, args.overrides, Path(tmp)))
            r = rows[-1]
            print(f"{r['config']}: {r['verdict']} ({r['total_seconds']:.0f} s)", flush=True)
    print(
        table(
            [
                "config",
                "m",
                "control bound (r, v)",
                "DP bound (r, v)",
                "formal ε",
                "DP run",
                "control run",
                "total",
            ],
            [
                [
                    r["config"],
                    r["canaries"],
                    f"{r['control_bound']:.2f} ({r['control_r']}, {r['control_v']})",
                    f"{r['dp_bound']:.2f} ({r['dp_r']}, {r['dp_v']})",
                    f"{r['formal_epsilon']:.2f} ({r['accountant']})",
                    f"{r['dp_seconds']:.0f} s",
                    f"{r['control_seconds']:.0f} s",
                    f"{r['total_seconds']:.0f} s",
                ]
                for r in rows
            ],
        )
    )
    if args.json:
        write_json(args.json, {"machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
