"""Deployment overhead: wall time of a deployed round minus a simulated round of the same work.

Issue 5's goal: at most 3 s of overhead per round beyond local training. Both sides run the
same job (model, LoRA, DP, local steps, batch size, rounds, seed) on the same number of sites
with the same number of rows each:

- Deployed: ``fedslm.deployment.loopback``: a coordinator (SuperLink with TLS and SuperNode
  authentication, behind the nginx proxy when nginx is installed) and one ``fedslm site start``
  daemon per site, separate processes on this machine, talking over loopback. Each message
  reaches the site's long-lived worker through Flower's SuperNode and a fresh (thin) ClientApp
  process.
- Simulated: ``fedslm simulate`` (Flower's simulation engine, one core per site).

Per round, from ``metrics.jsonl``: for round 1 its ``wall_seconds`` (global adapter sent ->
checkpoint and metrics written), for each later round the time since the previous round was
recorded (``finished_at``), i.e. what the round adds to the run (a deployed coordinator sends
round r+1's training with round r's evaluation); and the slowest site's local training time.
Round 1 is shown apart (model loading, Ray start-up); the overhead is the median over rounds
>= 2 of (deployed - simulated).

    python -m bench.deployment_overhead [--rounds 5] [--local-steps 5] [--rows-per-site 160]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, machine, median, table, write_json
from fedslm.data.synthetic import INTENTS
from fedslm.deployment.loopback import LoopbackDeployment


def job(args: argparse.Namespace, sites: list[str]) -> dict[str, Any]:
    """The job both sides run (the data section is set per side)."""
    return {
        "seed": 3,
        "model": {"name": args.model},
        "lora": {"r": 8, "alpha": 16},
        "train": {"local_steps": args.local_steps, "batch_size": 16, "max_length": 32},
        "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5},
        "federation": {"sites": sites, "rounds": args.rounds},
    }


def rounds(metrics: Path) -> list[tuple[float, float]]:
    """(seconds, slowest site's training seconds) per round: round 1's ``wall_seconds``,
    then the time from one round's record to the next (``finished_at``), what each further
    round adds to the run, whether or not its messages overlapped the previous round's."""
    out: list[tuple[float, float]] = []
    previous = None
    for line in metrics.read_text().splitlines():
        rec = yaml.safe_load(line)
        train = max((s.get("seconds", 0.0) for s in rec["sites"].values()), default=0.0)
        seconds = rec["wall_seconds"] if previous is None else rec["finished_at"] - previous
        out.append((float(seconds), float(train)))
        previous = rec["finished_at"]
    return out


def deployed(args: argparse.Namespace, root: Path, poll: float) -> list[tuple[float, float]]:
    """Run the job on a loopback deployment whose sites poll every ``poll`` seconds; its
    per-round figures."""
    names = tuple(f"site-{i + 1}" for i in range(args.sites))
    nginx = "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    d = LoopbackDeployment(
        root, names, rows_per_site=args.rows_per_site, nginx=nginx, poll_interval_s=poll
    )
    try:
        d.start()
        spec = job(args, list(names))
        spec["data"] = {"at_sites": True, "labels": list(INTENTS)}
        path = d.write_job("bench", spec)
        run = d.run(path, "bench")
        d.wait_finished("bench", 60 * args.rounds + 300)
        return rounds(run / "metrics.jsonl")
    finally:
        left = d.stop_all()
        if left:
            print(f"warning: processes left running: {left}", file=sys.stderr)


def simulated(args: argparse.Namespace, root: Path) -> list[tuple[float, float]]:
    """Run the same job with ``fedslm simulate``; its per-round figures."""
    root.mkdir(parents=True, exist_ok=True)
    spec = job(args, [f"site-{i + 1}" for i in range(args.sites)])
    spec["data"] = {"synthetic": {"rows_per_site": args.rows_per_site}}
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = root / "run"
    subprocess.run(
        [str(Path(sys.executable).parent / "fedslm"), "simulate", str(config), "--out",
         str(out), "--overwrite", "-q"],
        check=True, cwd=REPO,
    )  # fmt: skip
    return rounds(out / "metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--rows-per-site", type=int, default=160)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument(
        "--poll-interval", type=float, nargs="+", default=[0.5],
        help="the sites' daemon.poll_interval_s; one deployment each",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-deployment")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is reported apart)")
    shutil.rmtree(args.out, ignore_errors=True)
    sim = simulated(args, args.out / "sim")
    later = range(1, args.rounds)
    deployments = {p: deployed(args, args.out / f"deploy-{p:g}", p) for p in args.poll_interval}
    rows = [["simulated", "-", sim[0][0], median([sim[i][0] for i in later]), "-",
             median([sim[i][1] for i in later])]]  # fmt: skip
    overheads = {}
    for poll, dep in deployments.items():
        overheads[poll] = median([dep[i][0] - sim[i][0] for i in later])
        rows.append([
            "deployed", poll, dep[0][0], median([dep[i][0] for i in later]), overheads[poll],
            median([dep[i][1] for i in later]),
        ])  # fmt: skip
    print(f"{args.sites} sites, model {args.model}, {args.local_steps} DP steps per round, "
          f"{args.rows_per_site} rows per site")  # fmt: skip
    headers = ["", "site poll s", "round 1 s", f"rounds 2-{args.rounds} s (median)",
               "deployed - simulated s (median)", "local training s (median)"]  # fmt: skip
    print(table(headers, rows))
    for poll, overhead in overheads.items():
        print(f"overhead of deployment per round, sites polling every {poll:g} s: "
              f"{overhead:.2f} s (goal <= 3 s)")  # fmt: skip
    if args.json:
        write_json(
            args.json,
            {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
             "simulated": sim, "deployed": {str(p): d for p, d in deployments.items()},
             "overhead_s": {str(p): o for p, o in overheads.items()}},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
