"""Utility on BANKING77: test accuracy of centralized, federated and federated-DP training.

Four runs of the same model (minilm, LoRA r=8 on query,value) and training budget, each
through the ``fedslm`` command line, on the official train split divided into non-IID sites
(Dirichlet label split):

    (a) centralized, no DP   (b) federated, no DP
    (c) federated, DP at epsilon 8   (d) federated, DP at epsilon 3 (delta 1e-5, PRV accountant)

Each final ``adapter/`` is then loaded the way a stranger would (transformers + PEFT) and scored
on the official test split (3,080 rows, 40 per intent). The data set is read in place from
``--data-dir``; run outputs (which hold per-site copies of the data) go to a scratch folder
outside the repository, and only results, metrics, privacy reports and adapters to ``--out``.

    python -m bench.utility_banking77            # full run: ~40 min on 2 idle cores, ~60 busy
    python -m bench.utility_banking77 --quick    # a couple of minutes: checks the pipeline

``--study aggregation`` runs the LoRA aggregation comparison instead (issue 6): federated,
without DP and at epsilon 8, with ``fedavg-factors``, ``ffa`` and ``exact``. ``exact`` runs
the five sites at different ranks (4, 8, 8, 16, 16; global rank 16); the two factor-averaging
rules need one rank everywhere and run at rank 8 (the job default).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, machine, table, write_json
from bench.utility_eval import score_adapter, spaced

VARIANTS: dict[str, tuple[str, list[str]]] = {
    # name: (command, --set overrides on top of the written config)
    "centralized-nodp": ("centralized", ["privacy.enabled=false"]),
    "federated-nodp": ("simulate", ["privacy.enabled=false"]),
    "federated-dp-eps8": ("simulate", ["privacy.target_epsilon=8.0"]),
    "federated-dp-eps3": ("simulate", ["privacy.target_epsilon=3.0"]),
}

# rank per site for the heterogeneous-rank 'exact' runs (5 sites)
EXACT = [
    "federation.aggregation=exact",
    "lora.r=16",
    "lora.alpha=32",
    "federation.site_ranks={site-1: 4, site-2: 8, site-3: 8, site-4: 16, site-5: 16}",
]
AGGREGATION_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "nodp-fedavg-factors": ("simulate", ["privacy.enabled=false"]),
    "nodp-ffa": ("simulate", ["privacy.enabled=false", "federation.aggregation=ffa"]),
    "nodp-exact": ("simulate", ["privacy.enabled=false", *EXACT]),
    "dp8-fedavg-factors": ("simulate", ["privacy.target_epsilon=8.0"]),
    "dp8-ffa": ("simulate", ["privacy.target_epsilon=8.0", "federation.aggregation=ffa"]),
    "dp8-exact": ("simulate", ["privacy.target_epsilon=8.0", *EXACT]),
}
VARIANTS.update(AGGREGATION_VARIANTS)
STUDIES = {
    "utility": [k for k in VARIANTS if k not in AGGREGATION_VARIANTS],
    "aggregation": list(AGGREGATION_VARIANTS),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; defaults are the full run's settings, ``--quick`` swaps in tiny ones."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "data" / "banking77",
        help="folder with train.csv, test.csv, categories.json (default: ../shared/data/banking77)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench-banking77"))
    ap.add_argument("--work-dir", type=Path, help="scratch folder for run outputs (default: temp)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the label split")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate, all runs")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--eval-fraction", type=float, default=0.1, help="per-site held-out share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-rows", type=int, help="use only N evenly spaced training rows")
    ap.add_argument("--test-rows", type=int, help="score only N evenly spaced test rows")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    ap.add_argument(
        "--study",
        choices=list(STUDIES),
        default="utility",
        help="utility: centralized vs federated vs DP; aggregation: fedavg-factors/ffa/exact",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings (1,000 train rows, 1 round, 300 test rows) to check the pipeline",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.train_rows = args.train_rows or 1000
        args.test_rows = args.test_rows or 300
        args.rounds, args.local_epochs, args.batch_size = 1, 0.25, 32
        if args.out == Path("runs/bench-banking77"):
            args.out = Path("runs/bench-banking77-quick")
    if args.study != "utility" and args.out.name.startswith("bench-banking77"):
        args.out = args.out.with_name(args.out.name.replace("banking77", f"{args.study}-banking77"))
    return args


def write_config(args: argparse.Namespace, folder: Path) -> Path:
    """The job config every variant starts from, in ``folder``; the data file stays in place."""
    data_dir = args.data_dir.resolve()
    train = data_dir / "train.csv"
    if args.train_rows:
        train = subset_csv(train, args.train_rows, folder / "train-subset.csv")
    labels = json.loads((data_dir / "categories.json").read_text())
    raw = {
        "seed": args.seed,
        "model": {"name": "minilm"},
        "task": {"type": "classification"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
        "train": {
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "max_length": args.max_length,
            "eval_batch_size": 128,
        },
        "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": args.delta},
        "federation": {"sites": args.sites, "rounds": args.rounds},
        "data": {
            "path": str(train),
            "text_column": "text",
            "label_column": "category",
            # the closed set of 77 intents: every site and the test set agree on label ids,
            # even when the non-IID split leaves a site without some intents
            "labels": labels,
            "split": {"method": "dirichlet", "alpha": args.alpha},
            "eval_fraction": args.eval_fraction,
        },
    }
    path = folder / "banking77.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def subset_csv(source: Path, rows: int, target: Path) -> Path:
    """``rows`` evenly spaced rows of ``source`` (sorted by intent) in ``target``, scratch only."""
    with source.open(encoding="utf-8", newline="") as fh:
        header, *body = list(csv.reader(fh))
    with target.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(body[i] for i in spaced(len(body), rows))
    return target


def _policy_overrides(name: str) -> list[str]:
    """Simulated sites refuse non-DP jobs by default (site policy); a baseline must say so."""
    from fedslm.config import JobConfig

    if "nodp" in name and "policy" in JobConfig.model_fields:
        return ["policy.default.privacy.allow_no_dp=true"]
    return []


def run_variant(name: str, config: Path, work: Path, out: Path) -> dict[str, Any]:
    """Train one variant through the CLI; keep its small outputs in ``out/name``."""
    command, overrides = VARIANTS[name]
    overrides = [*overrides, *_policy_overrides(name)]
    run_dir = work / name
    cmd = [sys.executable, "-m", "fedslm.cli", command, str(config), "--out", str(run_dir)]
    cmd += ["--overwrite", "-q", *[a for o in overrides for a in ("--set", o)]]
    print(f"[{name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    train_seconds = time.perf_counter() - start
    keep = out / name
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    shutil.copytree(run_dir / "adapter", keep / "adapter")
    for f in ("metrics.jsonl", "privacy.json"):
        shutil.copy2(run_dir / f, keep / f)
    return {"command": command, "overrides": overrides, "train_seconds": train_seconds}


def summarize_run(keep: Path) -> dict[str, Any]:
    """Epsilon per site and the last round's held-out figures, from the kept outputs."""
    privacy = json.loads((keep / "privacy.json").read_text())
    last = [json.loads(line) for line in (keep / "metrics.jsonl").read_text().splitlines()][-1]
    eps = [p.get("epsilon") for p in privacy["sites"].values() if p.get("dp_enabled")]
    return {
        "epsilon_max": max(eps) if eps else None,
        "site_heldout_accuracy": last.get("eval_accuracy"),
        "rounds": last.get("round"),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.utility_banking77``."""
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="b77-"))
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(args, work)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for name in args.only or STUDIES[args.study]:
            res = run_variant(name, config, work, out)
            res |= summarize_run(out / name)
            t = time.perf_counter()
            res |= score_adapter(out / name / "adapter", args.data_dir / "test.csv", args.test_rows)
            res["test_seconds"] = time.perf_counter() - t
            results[name] = res
            write_json(out / name / "result.json", res)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {
        "benchmark": "utility_banking77",
        "machine": machine(),
        "settings": settings,
        "config": yaml.safe_load(config.read_text()) if config.exists() else None,
        "total_seconds": time.perf_counter() - started,
        "results": results,
    }
    write_json(out / "results.json", report)
    print(format_table(report))
    return 0


def format_table(report: dict[str, Any]) -> str:
    """The Markdown table of a ``results.json`` report."""
    rows = []
    for name, r in report["results"].items():
        eps = r.get("epsilon_max")
        rows.append(
            [
                name,
                f"{r['test_accuracy']:.4f}",
                r["test_examples"],
                "-" if eps is None else f"{eps:.2f}",
                "-" if r["site_heldout_accuracy"] is None else f"{r['site_heldout_accuracy']:.4f}",
                f"{r['train_seconds'] / 60:.1f}",
            ]
        )
    s = report["settings"]
    head = (
        f"BANKING77: {s['sites']} sites, Dirichlet alpha {s['alpha']}, {s['rounds']} rounds x "
        f"{s['local_epochs']} local epochs, batch {s['batch_size']}, max_length "
        f"{s['max_length']}, lr {s['lr']}, delta {s['delta']}; total "
        f"{report['total_seconds'] / 60:.1f} min"
    )
    headers = [
        "run",
        "test accuracy",
        "test rows",
        "epsilon (max site, PRV)",
        "sites' held-out acc.",
        "train min",
    ]
    return head + "\n" + table(headers, rows)


if __name__ == "__main__":
    raise SystemExit(main())
