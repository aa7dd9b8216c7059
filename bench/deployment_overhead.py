"""Deployment overhead: wall time of a deployed round against local training and against a
simulated round of the same work.

Issue 5's goal: at most 3 s of overhead per round beyond local training. Both sides run the
same job (model, LoRA, DP, local steps, batch size, rounds, seed) on the same number of sites
with the same number of rows each:

- Deployed: ``fedslm.deployment.loopback``: a coordinator (SuperLink with TLS and SuperNode
  authentication, behind the nginx proxy when nginx is installed) and one ``fedslm site start``
  daemon per site, separate processes on this machine, talking over loopback. Each message
  goes coordinator -> proxy -> the site's SuperNode -> its ClientApp executor -> its
  long-lived worker, and back.
- Simulated: ``fedslm simulate`` (Flower's simulation engine, one core per site).

Per round, from ``metrics.jsonl``: ``wall_seconds``, the round's share of the run (from the
previous round's aggregation to its own: its one message per site, which also carries the
sites' evaluation of the previous round's adapter), and the slowest site's local training
time. Round 1 is shown apart (model loading, Ray start-up), and the last round is left out
(it also counts the final evaluation, a message of its own). Over rounds 2 .. R-1 the table
gives the medians of the round, of (deployed - local training) and of (deployed - simulated).

    python -m bench.deployment_overhead [--rounds 6] [--local-steps 5] [--rows-per-site 160]
        [--poll-interval 0.2 ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, machine, median, own_ledgers_env, table, write_json
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
    """(wall seconds, slowest site's training seconds) per round."""
    out: list[tuple[float, float]] = []
    for line in metrics.read_text().splitlines():
        rec = yaml.safe_load(line)
        train = max((s.get("seconds", 0.0) for s in rec["sites"].values()), default=0.0)
        out.append((float(rec["wall_seconds"]), float(train)))
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
        check=True, cwd=REPO, env=own_ledgers_env(),
    )  # fmt: skip
    return rounds(out / "metrics.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--rows-per-site", type=int, default=160)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument(
        "--poll-interval", type=float, nargs="+", default=[0.2],
        help="the sites' daemon.poll_interval_s; one deployment each",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-deployment")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the first and the last are left out)")
    shutil.rmtree(args.out, ignore_errors=True)
    sim = simulated(args, args.out / "sim")
    later = range(1, args.rounds - 1)
    deployments = {p: deployed(args, args.out / f"deploy-{p:g}", p) for p in args.poll_interval}

    def row(name: str, poll: object, figures: list[tuple[float, float]]) -> list[object]:
        beyond_training = median([figures[i][0] - figures[i][1] for i in later])
        versus_sim = median([figures[i][0] - sim[i][0] for i in later])
        return [name, poll, figures[0][0], median([figures[i][0] for i in later]),
                median([figures[i][1] for i in later]), beyond_training, versus_sim]  # fmt: skip

    rows = [row("simulated", "-", sim)]
    rows += [row("deployed", poll, dep) for poll, dep in deployments.items()]
    print(f"{args.sites} sites, model {args.model}, {args.local_steps} DP steps per round, "
          f"{args.rows_per_site} rows per site; medians of rounds 2-{args.rounds - 1}")  # fmt: skip
    headers = ["", "site poll s", "round 1 s", "round s", "local training s",
               "round - local training s", "round - simulated round s"]  # fmt: skip
    print(table(headers, rows))
    summary = {str(r[1]): {"beyond_local_training_s": r[5], "over_simulated_s": r[6]}
               for r in rows[1:]}  # fmt: skip
    for poll, figures in summary.items():
        print(f"deployed, sites polling every {poll} s: {figures['beyond_local_training_s']:.2f} s "
              f"per round beyond local training (goal <= 3 s), "
              f"{figures['over_simulated_s']:.2f} s more than a simulated round")  # fmt: skip
    if args.json:
        write_json(
            args.json,
            {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
             "simulated": sim, "deployed": {str(p): d for p, d in deployments.items()},
             "summary": summary},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
