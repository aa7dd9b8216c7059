"""Run the benchmarks one after another and print their tables (``make bench``).

Each benchmark runs in its own process, so one cannot leave torch threads or Ray state behind
for the next. Raw results go to ``--out`` as JSON.

    python -m bench.run_all [--with-utility] [--quick] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO


def commands(out: Path, with_utility: bool, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, argv) of each benchmark to run, in order."""
    dp = ["--json", str(out / "dp_overhead.json")]
    fw = ["--json", str(out / "framework_overhead.json"), "--out", str(out / "framework")]
    # the full utility table goes to bench.utility's own row store (runs/bench-utility), built up
    # across sittings: rows already stored there are skipped
    util: list[str] = []
    ledger = ["--json", str(out / "ledger_overhead.json")]
    families = ["--json", str(out / "families.json")]
    aggregation = ["--json", str(out / "aggregation_throughput.json")]
    secagg = ["--json", str(out / "secagg_overhead.json"), "--out", str(out / "secagg")]
    worker = ["--json", str(out / "worker_overhead.json")]
    deployment = ["--json", str(out / "deployment_overhead.json"), "--out", str(out / "deploy")]
    if quick:
        # a check that every benchmark runs, not a measurement
        dp += ["--steps", "3", "--warmup", "1", "--budget", "30", "--max-wait", "0"]
        fw += ["--rounds", "2", "--local-steps", "2", "--repeats", "1", "--max-repeats", "1"]
        fw += ["--max-wait", "0"]
        util += ["--quick", "--out", str(out / "utility-quick"), "--redo", "--dataset", "twitter"]
        util += ["--runs", "centralized-nodp", "federated-dp-eps8", "--seeds", "0"]
        ledger += ["--rows", "150", "--rounds", "2", "--max-wait", "0"]
        families += ["--steps", "2", "--warmup", "1", "--max-wait", "0", "--budget", "10"]
        aggregation += ["--counts", "2", "4", "--repeats", "1", "--max-wait", "0"]
        secagg += ["--repeats", "1", "--max-wait", "0", "--sim-rounds", "2", "--sim-pairs", "1"]
        worker += ["--repeats", "1", "--max-repeats", "1", "--fat", "1", "--steps", "2"]
        worker += ["--max-wait", "0"]
        deployment += ["--rounds", "3", "--local-steps", "2"]
    runs = [
        ("dp_overhead", dp),
        ("framework_overhead", fw),
        ("ledger_overhead", ledger),
        ("families", families),
        ("aggregation_throughput", aggregation),
        ("secagg_overhead", secagg),
        ("worker_overhead", worker),
        ("deployment_overhead", deployment),
    ]
    if with_utility:
        runs.append(("utility", util))
    return runs


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.run_all``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON results")
    ap.add_argument(
        "--with-utility",
        action="store_true",
        help="also run the utility table (bench.utility: 3 data sets, many hours; resumable)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny settings: check, don't measure")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    failed = []
    for name, extra in commands(out, args.with_utility, args.quick):
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=REPO).returncode
        print(f"({name}: {time.perf_counter() - start:.0f} s, exit {code})", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
