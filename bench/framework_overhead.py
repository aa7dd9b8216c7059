"""Framework overhead: wall time of a simulated federated round ÷ the same local work standalone.

Goal: ≤ 1.10. Both sides run the demo's model (minilm) on synthetic data with DP on, a fixed
number of local steps, the same sites, seeds and rounds.

- Simulated: ``fedslm simulate`` in a subprocess (Flower simulation engine, Ray, one core per
  site). Each round's ``wall_seconds`` from ``metrics.jsonl``: from sending the global adapter
  to the sites until the round's checkpoint and metrics line are written. That covers messages,
  decoding, local training, FedAvg, evaluation and the checkpoint.
- Standalone: in this process, the sites of the same prepared job (``job.json`` of the
  simulated run), one after another with all cores: ``Site.train_round`` for each site, FedAvg,
  then ``Site.evaluate`` for each site. Model loading happens before the clock starts.

Round 1 is reported apart (the simulation pays Ray start-up and model loading there); the ratio
uses rounds ≥ 2. Simulated and standalone runs alternate (``--repeats`` pairs, more up to
``--max-repeats`` until ``--need`` quiet rounds per side); a round during which processes
outside this benchmark used more than ``--quiet`` cores is left out (the machine is shared).

    python -m bench.framework_overhead [--rounds 3] [--local-steps 10] [--rows-per-site 200]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import (
    REPO,
    machine,
    median,
    own_ledgers_env,
    table,
    wait_for_quiet,
    write_json,
)
from bench.procload import ForeignLoad
from fedslm.aggregation import fedavg
from fedslm.artifacts import read_jsonl
from fedslm.inprocess import build_site
from fedslm.job import PreparedJob
from fedslm.site import Site

EVAL_FRACTION = 0.2
BATCH = 32


def write_config(out: Path, rounds: int, local_steps: int, rows_per_site: int) -> Path:
    """The job both sides run, written to ``out/config.yaml``.

    The demo's model, LoRA, batch, max_length and privacy settings, spelled out here rather than
    read from configs/demo.yaml so the benchmark does not move when the demo is retuned.
    Local steps are set through ``local_epochs`` (``round(epochs / q)`` steps per round):
    ``fedslm simulate`` currently fails on a config with ``train.local_steps`` (the job manifest
    round-trips the default ``local_epochs`` next to it, which validation refuses).
    """
    train_rows = rows_per_site - round(EVAL_FRACTION * rows_per_site)
    raw = {
        "seed": 7,
        "model": {"name": "minilm"},
        "task": {"type": "classification"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
        "train": {
            "local_epochs": local_steps * BATCH / train_rows,
            "batch_size": BATCH,
            "learning_rate": 0.01,
            "max_length": 48,
        },
        "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5},
        "federation": {"sites": 3, "rounds": rounds},
        "data": {
            "synthetic": {"rows_per_site": rows_per_site, "skew": 1.0},
            "eval_fraction": EVAL_FRACTION,
        },
    }
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_simulated(config: Path, out: Path, monitor: ForeignLoad) -> list[dict[str, Any]]:
    """Run ``fedslm simulate`` in a subprocess; return one record per round.

    A round's end is when its line appears in ``metrics.jsonl`` (polled); its start is that
    minus its ``wall_seconds``. That window is what the foreign load is measured over.
    """
    shutil.rmtree(out, ignore_errors=True)
    metrics = out / "metrics.jsonl"
    cmd = [sys.executable, "-m", "fedslm.cli", "simulate", str(config), "--out", str(out), "-q"]
    ends: list[float] = []
    with subprocess.Popen(cmd, cwd=REPO, env=own_ledgers_env()) as proc:
        while proc.poll() is None:
            time.sleep(0.2)
            if metrics.exists():
                lines = metrics.read_text().count("\n")
                ends += [time.monotonic()] * (lines - len(ends))
    if proc.returncode:
        raise SystemExit(f"fedslm simulate failed (exit {proc.returncode}); see its output above")
    rounds = []
    for rec, end in zip(read_jsonl(metrics), ends, strict=True):
        sec = rec["wall_seconds"]
        rounds.append(
            {
                "round": rec["round"],
                "seconds": sec,
                "foreign_cores": monitor.cores(end - sec, end),
                "site_train_seconds": {s: v.get("seconds") for s, v in rec["sites"].items()},
                "site_steps": {s: v.get("steps") for s, v in rec["sites"].items()},
            }
        )
    return rounds


def build_sites(prepared: PreparedJob, ledgers: Path) -> list[Site]:
    """The job's sites, built as the ClientApp builds them (model loading included).

    Each site gets a fresh privacy ledger under ``ledgers`` and its own job id, so the standalone
    rounds neither collide with the simulated run's ledger entries nor count against its budget.
    """
    ledgers.mkdir(parents=True, exist_ok=True)
    standalone = replace(prepared, job_id=f"{prepared.job_id}-standalone")
    return [
        build_site(standalone, replace(setup, ledger=ledgers / f"{setup.name}.db"))
        for setup in prepared.sites
    ]


def run_standalone(sites: list[Site], rounds: int, monitor: ForeignLoad) -> list[dict[str, Any]]:
    """Time each round's local work, site after site, in this process; one record per round."""
    state = sites[0].initial_state()
    records = []
    for r in range(1, rounds + 1):
        start = time.monotonic()
        updates = []
        for site in sites:
            u = site.train_round(r, state)
            site.release(r, site.train_payload(u))  # checked and logged, as a site does
            updates.append(u)
        # FedAvg (well under a millisecond) so round r+1 starts from an aggregated adapter, as
        # in the simulation
        state = fedavg((u.state, float(u.num_examples)) for u in updates)
        for site in sites:
            site.release(r, site.eval_payload(site.evaluate(state)))
        end = time.monotonic()
        records.append(
            {
                "round": r,
                "seconds": end - start,
                "foreign_cores": monitor.cores(start, end),
                "site_train_seconds": {
                    s.name: u.seconds for s, u in zip(sites, updates, strict=True)
                },
                "site_steps": {s.name: u.steps for s, u in zip(sites, updates, strict=True)},
            }
        )
    return records


def _clean(rounds: list[dict[str, Any]], quiet: float) -> list[dict[str, Any]]:
    return [r for r in rounds if r["foreign_cores"] is not None and r["foreign_cores"] <= quiet]


def _quiet_later(runs: list[list[dict[str, Any]]], quiet: float) -> int:
    """How many rounds ≥ 2 of these runs were quiet."""
    return len(_clean([r for run in runs for r in run[1:]], quiet))


def summarize(
    sim: list[list[dict[str, Any]]], alone: list[list[dict[str, Any]]], quiet: float
) -> dict[str, Any]:
    """Medians of round 1 and of the quiet rounds ≥ 2 on each side, and their ratios.

    If a side has no quiet round ≥ 2, all its rounds ≥ 2 are used and ``disturbed`` says so.
    """
    out: dict[str, Any] = {"quiet_threshold_cores": quiet}
    for side, runs in (("sim", sim), ("standalone", alone)):
        later = [r for run in runs for r in run[1:]]
        clean = _clean(later, quiet)
        used = clean or later
        out[f"{side}_later_median_s"] = median([r["seconds"] for r in used]) if used else None
        out[f"{side}_later_rounds_used"] = len(used)
        out[f"{side}_later_rounds_total"] = len(later)
        out[f"{side}_later_disturbed"] = not clean
        out[f"{side}_round1_s"] = median([run[0]["seconds"] for run in runs])
        site_times = [t for r in used for t in r["site_train_seconds"].values()]
        out[f"{side}_site_train_median_s"] = median(site_times) if site_times else None
    a, b = out["sim_later_median_s"], out["standalone_later_median_s"]
    out["ratio_later"] = a / b if a and b else None
    out["ratio_round1"] = out["sim_round1_s"] / out["standalone_round1_s"]
    out["ratio_site_train"] = out["sim_site_train_median_s"] / out["standalone_site_train_median_s"]
    return out


def format_table(s: dict[str, Any]) -> str:
    """The Markdown table of ``summarize``'s result."""

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    def used(side: str) -> str:
        flag = " (all disturbed)" if s[f"{side}_later_disturbed"] else ""
        return f"{s[f'{side}_later_rounds_used']}/{s[f'{side}_later_rounds_total']}{flag}"

    rows = [
        [
            "round ≥ 2, median of quiet rounds",
            fmt(s["sim_later_median_s"]),
            fmt(s["standalone_later_median_s"]),
            fmt(s["ratio_later"]),
            f"sim {used('sim')}, standalone {used('standalone')}",
        ],
        [
            "round 1 (median over runs)",
            fmt(s["sim_round1_s"]),
            fmt(s["standalone_round1_s"]),
            fmt(s["ratio_round1"]),
            "all runs",
        ],
        [
            "one site's train_round, in those rounds ≥ 2",
            fmt(s["sim_site_train_median_s"]),
            fmt(s["standalone_site_train_median_s"]),
            fmt(s["ratio_site_train"]),
            "1 thread per site vs 2 threads",
        ],
    ]
    return table(["what (seconds)", "simulated", "standalone", "ratio", "rounds used"], rows)


def _rounds_line(name: str, run: list[dict[str, Any]]) -> str:
    parts = [
        f"{r['seconds']:.2f}"
        + ("" if r["foreign_cores"] is None else f" ({r['foreign_cores']:.2f})")
        for r in run
    ]
    return f"  {name}: round seconds (foreign cores): " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.framework_overhead``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--rows-per-site", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2, help="simulated/standalone pairs, at least")
    ap.add_argument(
        "--max-repeats", type=int, default=4, help="at most, while quiet rounds are missing"
    )
    ap.add_argument("--need", type=int, default=3, help="quiet rounds >= 2 wanted per side")
    ap.add_argument(
        "--quiet", type=float, default=0.25, help="most cores foreign processes may use in a round"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench-framework"), help="work folder")
    ap.add_argument("--max-wait", type=float, default=120, help="seconds to wait for quiet")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args(argv)

    out = args.out.resolve()
    config = write_config(out, args.rounds, args.local_steps, args.rows_per_site)
    monitor = ForeignLoad()
    monitor.start()
    sim_runs: list[list[dict[str, Any]]] = []
    alone_runs: list[list[dict[str, Any]]] = []
    sites: list[Site] | None = None
    i = 0
    while i < args.repeats or (
        i < args.max_repeats
        and min(_quiet_later(sim_runs, args.quiet), _quiet_later(alone_runs, args.quiet))
        < args.need
    ):
        i += 1
        wait_for_quiet(args.max_wait)
        print(f"[{i}] simulated run ...", file=sys.stderr, flush=True)
        sim_runs.append(run_simulated(config, out / "sim", monitor))
        # Fresh sites with fresh, empty ledgers for every standalone run: a ledger that already
        # holds a round skips recomputing its epsilon (seconds per site), which the simulated
        # run, with its new ledgers, always pays. Model loading here is not timed.
        sites = None  # let the previous run's models go before loading new ones
        ledgers = out / "ledgers" / f"run-{i}"
        shutil.rmtree(ledgers, ignore_errors=True)
        sites = build_sites(PreparedJob.load(out / "sim" / "job.json"), ledgers)
        wait_for_quiet(args.max_wait)
        print(f"[{i}] standalone run ...", file=sys.stderr, flush=True)
        alone_runs.append(run_standalone(sites, args.rounds, monitor))
    monitor.stop()
    summary = summarize(sim_runs, alone_runs, args.quiet)
    steps = sorted({v for run in sim_runs for r in run for v in r["site_steps"].values()})
    print(
        f"Framework overhead: minilm, DP on, {len(sites or [])} sites x {args.rows_per_site} rows, "
        f"local steps per round {steps}, {args.rounds} rounds, {i} simulated/standalone pairs; "
        f"standalone torch threads {torch.get_num_threads()}; quiet = foreign processes used "
        f"<= {args.quiet} cores (goal ratio <= 1.10)"
    )
    print(format_table(summary))
    for name, runs in (("simulated", sim_runs), ("standalone", alone_runs)):
        for run in runs:
            print(_rounds_line(name, run))
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "framework_overhead",
                "machine": machine(),
                "settings": {
                    k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                },
                "simulated": sim_runs,
                "standalone": alone_runs,
                "summary": summary,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
