"""Privacy bookkeeping per round ÷ the round's local training time (goal: below 1%).

A site's round does, before training: read its ledger, check the policy (the data set's spend
after this round against the lifetime and per-job budgets, composed with the site's
accountant), append the ledger entry (one SQLite transaction; the ledger composes the epsilon
itself with PRV and again with PLD), and compute the job's epsilon for the reply.
``Site.train_round`` times all of that as ``privacy_seconds`` and the training alone as
``seconds``; this benchmark runs real rounds of the default model and reports both.

Two jobs run one after the other on the same data set and ledger, so the second composes
with the first (the lifetime case). The first round of the first job is shown apart: it pays
the accountants' one-off set-up in a fresh process (imports, Opacus' RDP domain bound per
(q, sigma), which fedslm then caches). Also measured once: ``fedslm ledger verify`` on the
resulting ledger (an auditor's cost, not a round's).

    python -m bench.ledger_overhead [--rows 1000] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import machine, median, spread, table, wait_for_quiet, write_json
from fedslm.config import validate_config
from fedslm.inprocess import build_site
from fedslm.job import prepare_job
from fedslm.privacy.ledger import PrivacyLedger


def job_config(rows: int, rounds: int) -> dict:
    """The demo's site settings (MiniLM, batch 32, max_length 48, target epsilon 8) at one
    site with ``rows`` records; local training is one epoch per round."""
    return {
        "seed": 0,
        "model": {"name": "minilm"},
        "train": {"batch_size": 32, "max_length": 48, "learning_rate": 0.01},
        "privacy": {"target_epsilon": 4.0},
        "federation": {"sites": 1, "rounds": rounds},
        "data": {"synthetic": {"rows_per_site": rows}},
        # two jobs of epsilon 4 on one data set: the second must compose with the first
        "policy": {"default": {"privacy": {"lifetime_epsilon": 10, "max_epsilon_per_job": 8}}},
    }


def run(rows: int, rounds: int, workdir: Path) -> dict:
    """Two jobs of ``rounds`` rounds each on one site; per-round timings."""
    job = validate_config(job_config(rows, rounds), source="bench.ledger_overhead")
    prepared = prepare_job(job, "bench.ledger_overhead", workdir)
    setup = prepared.sites[0]
    results = []
    for job_no in (1, 2):
        # a second job id on the same data set and ledger: the second job composes
        site = build_site(replace(prepared, job_id=f"{prepared.job_id}-{job_no}"), setup)
        state = site.initial_state()
        for r in range(1, rounds + 1):
            u = site.train_round(r, state)
            state = u.state
            results.append(
                {
                    "job": job_no,
                    "round": r,
                    "steps": u.steps,
                    "train_s": u.seconds,
                    "privacy_s": u.privacy_seconds,
                    "fraction": u.privacy_seconds / u.seconds,
                    "lifetime_epsilon": u.lifetime_epsilon,
                }
            )
            print(
                f"  job {job_no} round {r}: train {u.seconds:.2f} s, privacy "
                f"{u.privacy_seconds * 1000:.0f} ms, lifetime epsilon {u.lifetime_epsilon:.3f}",
                flush=True,
            )
    start = time.perf_counter()
    with PrivacyLedger(setup.ledger, create=False) as ledger:
        problems = ledger.verify()
        entries = len(ledger.entries())
    verify_s = time.perf_counter() - start
    assert not problems, problems
    return {
        "rows": rows,
        "train_records": site.plan.records,
        "sample_rate": site.plan.sample_rate,
        "noise_multiplier": site.plan.noise_multiplier,
        "rounds": results,
        "verify_s": verify_s,
        "verify_entries": entries,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.ledger_overhead``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000, help="records at the site (80% train)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per job (two jobs run)")
    ap.add_argument("--max-wait", type=float, default=600, help="s to wait for a quiet machine")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    load = wait_for_quiet(args.max_wait)
    with tempfile.TemporaryDirectory(prefix="fedslm-ledger-bench-") as tmp:
        res = run(args.rows, args.rounds, Path(tmp) / "run")
    rows = res["rounds"]
    first, rest = rows[0], rows[1:]
    job2 = [r for r in rows if r["job"] == 2]
    summary = [
        [
            "first round of a fresh process",
            1,
            first["train_s"],
            first["privacy_s"] * 1000,
            f"{first['fraction']:.2%}",
        ],
        [
            "every later round (median)",
            len(rest),
            median([r["train_s"] for r in rest]),
            median([r["privacy_s"] for r in rest]) * 1000,
            f"{median([r['fraction'] for r in rest]):.2%}",
        ],
        [
            "second job on the same data (median)",
            len(job2),
            median([r["train_s"] for r in job2]),
            median([r["privacy_s"] for r in job2]) * 1000,
            f"{median([r['fraction'] for r in job2]):.2%}",
        ],
    ]
    print(
        f"\nsite: {res['train_records']} training records, q = {res['sample_rate']:.4f}, "
        f"{first['steps']} DP steps per round, sigma {res['noise_multiplier']:.3f}; "
        f"other load before start: {load if load is None else round(load, 2)} cores"
    )
    print(table(["rounds", "n", "training s", "privacy bookkeeping ms", "fraction"], summary))
    print(
        f"privacy ms per later round: {spread([r['privacy_s'] * 1000 for r in rest])}; "
        f"`ledger verify` of {res['verify_entries']} entries: {res['verify_s']:.2f} s"
    )
    if args.json:
        write_json(args.json, {"machine": machine(), **res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
