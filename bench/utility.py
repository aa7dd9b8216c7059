"""Utility on real data of centralized, federated and federated-DP training at the defaults.

What the job's default settings deliver on three public data sets, built up row by row
(issue 14's benchmark).

Data sets (read in place from ``--data-root``, default ``../shared/data``; never copied into the
repository; scratch copies go to a temporary folder outside it):

    banking77  BANKING77 intents (77): official train.csv / test.csv, labels from categories.json
    twitter    Twitter financial news sentiment (3): sent_train.csv / sent_valid.csv, labels
               0/1/2 written out as the names "bearish" / "bullish" / "neutral"
    medical    Medical abstracts (5 conditions): its one file medical_tc_test.csv, split 80/20
               stratified by label with seed 14 (SPLIT_SEED), names from medical_tc_labels.csv

Every row trains one job through the ``fedslm`` command line on the full training split, 5
sites with a Dirichlet(0.5) label split (``data.split``'s default), and otherwise the job
DEFAULTS: the written config sets only the data keys, ``data.labels``, ``federation.sites`` and
``seed``; the settings a row changes are its ``--set`` overrides, recorded in the row (each
site still holds out ``data.eval_fraction`` of its rows for its own evaluation). The final
``adapter/`` is then loaded the way a stranger would (transformers + PEFT) and scored on the
test split: accuracy and macro-F1 (``bench/utility_eval.py``).

Runs (``--runs``; the default set is the table issue 14 asks for):

    centralized-nodp    fedslm centralized, no DP (the pooled data of the same 5 sites)
    federated-nodp      fedslm simulate, no DP
    federated-dp-eps8   fedslm simulate, record-level DP at epsilon 8 (seeds 0 and 1)
    federated-dp-eps3   the same at epsilon 3 (seeds 0 and 1)
    head-dp-eps8        the DP linear-probe reference: train.mode=head, epsilon 8
    nodp-fedavg-factors, nodp-ffa, nodp-exact, dp8-fedavg-factors, dp8-ffa, dp8-exact
                        the LoRA aggregation study of issue 6 (not in the default set);
                        ``exact`` runs the sites at ranks 4, 8, 8, 16, 16 (global rank 16)

Rows are built up across sittings: each finished row is written at once to
``ROWS/DATASET/RUN[-seedS][-TAG].json`` (date, git commit, command, overrides, the written
and the resolved config, wall seconds of training and of scoring, epsilon, scores), and a row
already stored is skipped unless ``--redo``. ``-seedS`` is in the name of the multi-seed runs
(the DP rows) and of any row run with a seed other than 0; ``-TAG`` names the extra ``--set``
overrides of a study, so study rows never overwrite default rows. The run's ``metrics.jsonl``,
``privacy.json`` and ``adapter/`` are kept in ``OUT/artifacts/``. ``ROWS`` defaults to
``bench/results/utility/``, which is committed: a row measured in one sitting is part of the
table in the next (``--quick`` rows go to ``OUT/rows`` and are never committed). A row that fails
(a config the library rejects, a failed run) is reported, not stored; the exit code is then 1.
``--table`` trains
nothing and prints the Markdown table of all stored rows, with the goal checks of issue 14.

    python -m bench.utility --dataset twitter                        # its default rows
    python -m bench.utility --dataset medical --runs federated-dp-eps8 --seeds 2
    python -m bench.utility --dataset banking77 --runs dp8-ffa nodp-ffa   # aggregation study
    python -m bench.utility --dataset twitter --runs federated-dp-eps8 \\
        --set train.learning_rate=0.001                              # a study row, tagged
    python -m bench.utility --table                                  # the table so far
    python -m bench.utility --quick --dataset twitter --runs federated-nodp   # pipeline check

``--quick``: 500 training rows, 1 round, 300 test rows, stored under ``runs/bench-utility-quick``
(never mixed with real rows); a quick row took 40-70 s on a shared 2-core machine. Non-DP
rows set the simulated sites' policy ``policy.default.privacy.allow_no_dp=true`` (sites refuse
non-DP jobs by default).
Run one data set or one row at a time on a shared 2-core machine (``OMP_NUM_THREADS=1`` keeps a
neighbour's job from slowing torch down several times).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import REPO, machine, table, write_json
from bench.procload import ForeignLoad
from bench.utility_eval import score_adapter, spaced

DATA_ROOT = REPO.parent / "shared" / "data"
OUT = REPO / "runs" / "bench-utility"
QUICK_OUT = REPO / "runs" / "bench-utility-quick"
ROWS = REPO / "bench" / "results" / "utility"  # committed: the table is built across sittings
SITES = 5
SPLIT_SEED = 14  # the medical abstracts' fixed 80/20 train/test split (issue 14)
TEST_FRACTION = 0.2
QUICK_TRAIN_ROWS = 500
QUICK_TEST_ROWS = 300
# 500 rows over 5 Dirichlet(0.5) sites leave some site a handful of records, which its policy
# refuses (min_train_records 20): a pipeline check runs with the sites that remain
QUICK_OVERRIDES = ["federation.rounds=1", "federation.min_sites=2"]
NO_DP_POLICY = "policy.default.privacy.allow_no_dp=true"


# --------------------------------------------------------------------------------------------
# Data sets


@dataclass(frozen=True)
class Dataset:
    """One data set ready to train on: train and test files, their columns, the label set."""

    name: str
    train: Path
    test: Path
    text_column: str
    label_column: str
    labels: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: Sequence[dict[str, str]], columns: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows({c: r[c] for c in columns} for r in rows)
    return path


def prepare_banking77(root: Path, scratch: Path) -> Dataset:
    """BANKING77 in place: official train.csv / test.csv, the 77 intents of categories.json."""
    folder = root / "banking77"
    labels = json.loads((folder / "categories.json").read_text())
    return Dataset(
        name="banking77",
        train=folder / "train.csv",
        test=folder / "test.csv",
        text_column="text",
        label_column="category",
        labels=labels,
        info={"source": str(folder), "split": "official train / test"},
    )


TWITTER_NAMES = {"0": "bearish", "1": "bullish", "2": "neutral"}


def prepare_twitter(root: Path, scratch: Path) -> Dataset:
    """Twitter financial news sentiment: sent_train / sent_valid rewritten (in ``scratch``)
    with the label names, which the model may read to initialise its head."""
    folder = root / "twitter_financial_news_sentiment"
    files = {}
    for part, source in (("train", "sent_train.csv"), ("test", "sent_valid.csv")):
        rows = [
            {"text": r["text"], "label": TWITTER_NAMES[r["label"].strip()]}
            for r in _read_csv(folder / source)
        ]
        files[part] = _write_csv(scratch / f"twitter-{part}.csv", rows, ["text", "label"])
    return Dataset(
        name="twitter",
        train=files["train"],
        test=files["test"],
        text_column="text",
        label_column="label",
        labels=list(TWITTER_NAMES.values()),
        info={
            "source": str(folder),
            "split": "sent_train / sent_valid",
            "label_ids": TWITTER_NAMES,
        },
    )


def prepare_medical(root: Path, scratch: Path) -> Dataset:
    """Medical abstracts: the one published file split 80/20, stratified by label, with the
    fixed seed ``SPLIT_SEED``; labels are the condition names of medical_tc_labels.csv."""
    folder = root / "medical_abstracts"
    names = {
        r["condition_label"].strip(): r["condition_name"].strip()
        for r in _read_csv(folder / "medical_tc_labels.csv")
    }
    rows = [
        {"text": r["medical_abstract"], "label": names[r["condition_label"].strip()]}
        for r in _read_csv(folder / "medical_tc_test.csv")
    ]
    train_idx, test_idx = stratified_split([r["label"] for r in rows], TEST_FRACTION, SPLIT_SEED)
    train = _write_csv(
        scratch / "medical-train.csv", [rows[i] for i in train_idx], ["text", "label"]
    )
    test = _write_csv(scratch / "medical-test.csv", [rows[i] for i in test_idx], ["text", "label"])
    return Dataset(
        name="medical",
        train=train,
        test=test,
        text_column="text",
        label_column="label",
        labels=list(names.values()),
        info={
            "source": str(folder / "medical_tc_test.csv"),
            "split": f"{1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} stratified, seed {SPLIT_SEED}",
        },
    )


def stratified_split(
    labels: Sequence[str], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, test) row indices: each label's rows shuffled with ``seed`` (numpy
    ``default_rng``, labels in sorted order) and ``round(n * test_fraction)`` of them put in
    test. Both lists are sorted, so the files keep the source's row order."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels)):
        idx = rng.permutation([i for i, lab in enumerate(labels) if lab == label])
        cut = round(len(idx) * test_fraction)
        test.extend(int(i) for i in idx[:cut])
        train.extend(int(i) for i in idx[cut:])
    return sorted(train), sorted(test)


DATASETS: dict[str, Callable[[Path, Path], Dataset]] = {
    "banking77": prepare_banking77,
    "twitter": prepare_twitter,
    "medical": prepare_medical,
}


def subset(data: Dataset, scratch: Path, train_rows: int | None) -> Dataset:
    """``data`` with only ``train_rows`` evenly spaced training rows (a scratch copy)."""
    if not train_rows:
        return data
    rows = _read_csv(data.train)
    if train_rows >= len(rows):
        return data
    cols = [data.text_column, data.label_column]
    kept = [rows[i] for i in spaced(len(rows), train_rows)]
    train = _write_csv(scratch / f"{data.name}-train-{train_rows}.csv", kept, cols)
    info = {**data.info, "train_subset": f"{train_rows} evenly spaced rows of {len(rows)}"}
    return dataclasses.replace(data, train=train, info=info)


def count_rows(path: Path) -> int:
    """Data rows of a CSV file (quoted newlines handled)."""
    return len(_read_csv(path))


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Run:
    """One kind of row: the fedslm command and its ``--set`` overrides on the written config."""

    command: str  # "simulate" or "centralized"
    overrides: tuple[str, ...]
    description: str
    multi_seed: bool = False  # run over --seeds (default 0 1) rather than seed 0 only


# the 'exact' aggregation at heterogeneous ranks (one per site, 5 sites; global rank 16)
EXACT = (
    "federation.aggregation=exact",
    "lora.r=16",
    "lora.alpha=32",
    "federation.site_ranks={site-1: 4, site-2: 8, site-3: 8, site-4: 16, site-5: 16}",
)
NODP = ("privacy.enabled=false",)
DP8 = ("privacy.target_epsilon=8",)

RUNS: dict[str, Run] = {
    "centralized-nodp": Run("centralized", NODP, "centralized, no DP"),
    "federated-nodp": Run("simulate", NODP, "federated, no DP"),
    "federated-dp-eps8": Run("simulate", DP8, "federated, DP epsilon 8", multi_seed=True),
    "federated-dp-eps3": Run(
        "simulate", ("privacy.target_epsilon=3",), "federated, DP epsilon 3", multi_seed=True
    ),
    "head-dp-eps8": Run(
        "simulate", ("train.mode=head", *DP8), "DP linear probe (head mode), epsilon 8"
    ),
    # the LoRA aggregation study (issue 6): each rule named explicitly, whatever the default
    "nodp-fedavg-factors": Run(
        "simulate", (*NODP, "federation.aggregation=fedavg-factors"), "no DP, fedavg-factors"
    ),
    "nodp-ffa": Run("simulate", (*NODP, "federation.aggregation=ffa"), "no DP, ffa"),
    "nodp-exact": Run("simulate", (*NODP, *EXACT), "no DP, exact, ranks 4-16"),
    "dp8-fedavg-factors": Run(
        "simulate", (*DP8, "federation.aggregation=fedavg-factors"), "epsilon 8, fedavg-factors"
    ),
    "dp8-ffa": Run("simulate", (*DP8, "federation.aggregation=ffa"), "epsilon 8, ffa"),
    "dp8-exact": Run("simulate", (*DP8, *EXACT), "epsilon 8, exact, ranks 4-16"),
}
DEFAULT_RUNS = [
    "centralized-nodp",
    "federated-nodp",
    "federated-dp-eps8",
    "federated-dp-eps3",
    "head-dp-eps8",
]


def overrides_tag(overrides: Sequence[str], name: str | None = None) -> str:
    """A short file-name-safe tag for extra overrides ('' for none): the last key part and
    value of each, shortened, plus a hash of all of them so two studies never share a name."""
    if not overrides and not name:
        return ""
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:6]
    if name:
        readable = name
    else:
        readable = "_".join(
            f"{o.partition('=')[0].split('.')[-1]}-{o.partition('=')[2]}" for o in overrides
        )
    readable = re.sub(r"[^A-Za-z0-9._+-]+", "_", readable).strip("_")[:28]
    return f"{readable}-{digest}" if readable else digest


def row_stem(run: str, seed: int, tag: str) -> str:
    """``RUN[-seedS][-TAG]``: the seed for multi-seed runs and any seed but 0."""
    stem = run
    if RUNS[run].multi_seed or seed != 0:
        stem += f"-seed{seed}"
    return f"{stem}-{tag}" if tag else stem


def write_config(data: Dataset, seed: int, folder: Path) -> tuple[Path, dict[str, Any]]:
    """The job config of a row: data keys, the label set, 5 sites, the seed. Nothing else: every
    training setting is the job default. Returns its path (in ``folder``) and its content."""
    raw = {
        "seed": seed,
        "federation": {"sites": SITES},
        "data": {
            "path": str(data.train),
            "text_column": data.text_column,
            "label_column": data.label_column,
            # the closed label set: every site and the test set agree on label ids, even when
            # the non-IID split leaves a site without some labels
            "labels": data.labels,
        },
    }
    path = folder / f"{data.name}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


class RowFailed(Exception):
    """A row could not be trained or scored; the message says why."""


def git_commit() -> str:
    """The repository's HEAD commit (12 hex digits), ``-dirty`` when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def resolve(config: Path, overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Validate the row's config with this library; add the no-DP site policy when DP is off.

    Returns the final overrides and the resolved config (every default written out), or raises
    ``RowFailed`` with the library's own message (e.g. a key the library does not know yet).
    """
    from fedslm.config import load_config
    from fedslm.errors import FedSLMError

    try:
        job = load_config(config, overrides)
        if not job.privacy.enabled and NO_DP_POLICY not in overrides:
            overrides = [*overrides, NO_DP_POLICY]
            job = load_config(config, overrides)
    except FedSLMError as exc:
        raise RowFailed(f"the config does not validate with this library:\n{exc}") from None
    return overrides, job.model_dump(mode="json")


def run_fedslm(cmd: list[str], ledgers: Path) -> tuple[float, list[str]]:
    """Run a fedslm command with its stderr passed through; return its wall seconds and the
    last lines of its stderr (warnings), or raise ``RowFailed`` with them.

    Every row is a separate experiment on public data: its simulated sites get a ledger folder
    of their own (``FEDSLM_LEDGERS``), or the rows would compose on one data set's budget and
    later rows be refused.
    """
    tail: deque[str] = deque(maxlen=25)
    start = time.perf_counter()
    env = {**os.environ, "FEDSLM_LEDGERS": str(ledgers)}
    with subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code:
        raise RowFailed(f"fedslm exited with {code} after {seconds:.0f} s:\n" + "\n".join(tail))
    return seconds, list(tail)


def privacy_summary(privacy: dict[str, Any]) -> dict[str, Any]:
    """Epsilon (max over sites, with its accountant) and per-site DP figures of privacy.json."""
    sites = privacy.get("sites", {})
    dp = {name: p for name, p in sites.items() if p.get("dp_enabled")}
    eps = [p["epsilon"] for p in dp.values() if p.get("epsilon") is not None]
    return {
        "epsilon": max(eps) if eps else None,
        "accountant": next((p.get("accountant") for p in dp.values()), None),
        "delta": next((p.get("delta") for p in dp.values()), None),
        "epsilon_checks": sorted({str(p.get("epsilon_check")) for p in dp.values()}),
        "sites": {
            name: {
                k: p.get(k)
                for k in ("records", "epsilon", "noise_multiplier", "sample_rate", "dp_steps")
                if p.get(k) is not None
            }
            | ({"refusals": p["refusals"]} if p.get("refusals") else {})
            for name, p in sites.items()
        },
    }


def bench_command(dataset: str, run: str, seed: int, args: argparse.Namespace) -> str:
    """The command line that trains this one row again."""
    parts = ["python -m bench.utility", f"--dataset {dataset}", f"--runs {run}", f"--seeds {seed}"]
    parts += [f"--set '{o}'" for o in args.extra]
    parts += [f"--tag {args.tag}"] if args.tag else []
    parts += ["--quick"] if args.quick else []
    if not args.quick:
        parts += [f"--train-rows {args.train_rows}"] if args.train_rows else []
        parts += [f"--test-rows {args.test_rows}"] if args.test_rows else []
    return " ".join([*parts, "--redo"])


def train_row(
    data: Dataset,
    name: str,
    seed: int,
    extra: list[str],
    tag: str,
    args: argparse.Namespace,
    scratch: Path,
) -> dict[str, Any]:
    """Train, keep and score one row; return its record (``RowFailed`` if it cannot)."""
    run = RUNS[name]
    config, written = write_config(data, seed, scratch)
    quick = QUICK_OVERRIDES if args.quick else []
    overrides, resolved = resolve(config, [*run.overrides, *quick, *extra])
    run_dir = scratch / "run"
    cmd = [sys.executable, "-m", "fedslm.cli", run.command, str(config), "--out", str(run_dir)]
    cmd += ["--overwrite", *([] if args.verbose else ["-q"])]
    cmd += [a for o in overrides for a in ("--set", o)]
    commit, date = git_commit(), dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    print(f"[{data.name}/{name} seed {seed}] fedslm {' '.join(cmd[3:])}", file=sys.stderr)
    monitor = ForeignLoad(interval=5.0)
    monitor.start()
    t0 = time.monotonic()
    try:
        ledgers = Path(tempfile.mkdtemp(prefix="ledgers-", dir=scratch))
        train_seconds, stderr_tail = run_fedslm(cmd, ledgers)
    finally:
        t1 = time.monotonic()
        monitor.stop()
    keep = args.out / "artifacts" / data.name / row_stem(name, seed, tag)
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    try:
        shutil.copytree(run_dir / "adapter", keep / "adapter")
        for f in ("metrics.jsonl", "privacy.json"):
            shutil.copy2(run_dir / f, keep / f)
    except OSError as exc:
        raise RowFailed(f"fedslm finished but left no {exc.filename}") from None
    privacy = privacy_summary(json.loads((keep / "privacy.json").read_text()))
    metrics = [json.loads(x) for x in (keep / "metrics.jsonl").read_text().splitlines() if x]
    start = time.perf_counter()
    try:
        scores = score_adapter(
            keep / "adapter", data.test, args.test_rows, data.text_column, data.label_column
        )
    except Exception as exc:  # any failure to load or score the adapter ends the row
        raise RowFailed(f"scoring the adapter failed: {type(exc).__name__}: {exc}") from exc
    score_seconds = time.perf_counter() - start
    return {
        "dataset": data.name,
        "run": name,
        "description": run.description,
        "seed": seed,
        "tag": tag,
        "quick": args.quick,
        "date": date,
        "commit": commit,
        "bench_command": bench_command(data.name, name, seed, args),
        "command": ["fedslm", *cmd[3:]],
        "fedslm_command": run.command,
        "overrides": overrides,
        "extra_overrides": extra,
        "config": written,
        "resolved_config": resolved,
        "data": {
            **data.info,
            "train_rows": count_rows(data.train),
            "test_rows_scored": scores["test_examples"],
            "labels": len(data.labels),
        },
        "train_seconds": train_seconds,
        "score_seconds": score_seconds,
        "foreign_cores_training": monitor.cores(t0, t1),
        "fedslm_stderr_tail": stderr_tail,
        "privacy": privacy,
        "epsilon": privacy["epsilon"],
        "rounds": metrics[-1].get("round") if metrics else None,
        "site_eval_accuracy_last_round": metrics[-1].get("eval_accuracy") if metrics else None,
        "scores": scores,
        "machine": machine(),
        "artifacts": str(keep.relative_to(args.out)),
    }


# --------------------------------------------------------------------------------------------
# The table


def load_rows(rows: Path) -> list[dict[str, Any]]:
    """Every stored row under ``out/rows``."""
    return [json.loads(p.read_text()) for p in sorted(rows.glob("*/*.json"))]


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def _group(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (run, tag), default runs first, then the other named runs, then tagged rows."""
    order = {name: i for i, name in enumerate([*DEFAULT_RUNS, *RUNS])}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["run"], r.get("tag", "")), []).append(r)
    return dict(
        sorted(groups.items(), key=lambda kv: (kv[0][1] != "", order.get(kv[0][0], 99), kv[0]))
    )


def _acc(group: list[dict[str, Any]] | None) -> float | None:
    if not group:
        return None
    return sum(r["scores"]["test_accuracy"] for r in group) / len(group)


# the most accuracy points a run may lose against centralized-nodp, per data set (issue 14)
GAP_LIMITS = {
    "banking77": {"federated-dp-eps8": 10.0, "federated-dp-eps3": 15.0},
    "twitter": {"federated-dp-eps8": 5.0, "federated-dp-eps3": 8.0},
    "medical": {"federated-dp-eps8": 5.0, "federated-dp-eps3": 8.0},
}
NODP_LIMIT = 3.0


def goal_checks(
    dataset: str, groups: dict[tuple[str, str], list[dict[str, Any]]]
) -> list[list[Any]]:
    """Issue 14's goals for one data set, from its untagged rows: [goal, figures, gap, result]."""
    acc = {run: _acc(g) for (run, tag), g in groups.items() if not tag}
    central = acc.get("centralized-nodp")
    checks: list[list[Any]] = []
    limits = {**GAP_LIMITS.get(dataset, {}), "federated-nodp": NODP_LIMIT}
    for run in ("federated-dp-eps8", "federated-dp-eps3", "federated-nodp"):
        goal = f"{run} within {limits[run]:g} points of centralized-nodp"
        if central is None or acc.get(run) is None:
            missing = [n for n in ("centralized-nodp", run) if acc.get(n) is None]
            checks.append([goal, "-", "-", f"n/a (no {', '.join(missing)} row)"])
            continue
        gap = (central - acc[run]) * 100
        checks.append(
            [
                goal,
                f"{acc[run]:.3f} vs {central:.3f}",
                f"{gap:+.1f}",
                "met" if round(gap, 6) <= limits[run] else "MISSED",
            ]
        )
    head = acc.get("head-dp-eps8")
    # fedslm's DP rows at epsilon 8 or less (the reference itself aside)
    dp_rows: dict[str, float] = {}
    for (run, tag), g in groups.items():
        a = _acc(g)
        if tag or run == "head-dp-eps8" or a is None:
            continue
        if all(r.get("epsilon") is not None and r["epsilon"] <= 8.0 + 1e-3 for r in g):
            dp_rows[run] = a
    goal = "best DP row (epsilon <= 8) at or above head-dp-eps8"
    if head is None or not dp_rows:
        missing = (["head-dp-eps8"] if head is None else []) + ([] if dp_rows else ["DP"])
        checks.append([goal, "-", "-", f"n/a (no {', '.join(missing)} row)"])
    else:
        best = max(dp_rows, key=lambda k: dp_rows[k])
        gap = (dp_rows[best] - head) * 100
        checks.append(
            [
                goal,
                f"{best} {dp_rows[best]:.3f} vs {head:.3f}",
                f"{gap:+.1f}",
                "met" if round(gap, 6) >= 0 else "MISSED",
            ]
        )
    return checks


def format_tables(rows: list[dict[str, Any]], datasets: Sequence[str] | None = None) -> str:
    """The Markdown tables of the stored rows, one per data set, each with its goal checks."""
    out: list[str] = []
    for dataset in [d for d in DATASETS if datasets is None or d in datasets]:
        mine = [r for r in rows if r["dataset"] == dataset]
        if not mine:
            out.append(f"### {dataset}\n\nno rows stored\n")
            continue
        groups = _group(mine)
        lines = []
        for (run, tag), g in groups.items():
            eps = [r["epsilon"] for r in g if r.get("epsilon") is not None]
            accountant = next((r["privacy"]["accountant"] for r in g if r.get("epsilon")), "")
            lines.append(
                [
                    run,
                    tag or "-",
                    ",".join(str(r["seed"]) for r in sorted(g, key=lambda r: r["seed"])),
                    _mean_spread([r["scores"]["test_accuracy"] for r in g]),
                    _mean_spread([r["scores"]["test_macro_f1"] for r in g]),
                    f"{sum(r['train_seconds'] for r in g) / len(g) / 60:.1f}",
                    f"{sum(r['score_seconds'] for r in g) / len(g) / 60:.1f}",
                    f"{max(eps):.2f} ({accountant})" if eps else "-",
                    max(r["date"] for r in g)[:16].replace("T", " "),
                    ",".join(sorted({r["commit"] for r in g})),
                ]
            )
        # the header describes the data set as the default rows saw it, not a tagged study's
        # subset (e.g. --train-rows)
        base = next((r for r in mine if not r.get("tag")), mine[0])
        first = base["data"]
        split = base.get("resolved_config", {}).get("data", {}).get("split", {})
        how = f"{split['method']} {split.get('alpha', '')}".strip() if split else "?"
        quick = "QUICK rows (a pipeline check: the figures mean nothing); " * base["quick"]
        out.append(
            f"### {dataset}\n\n{quick}train rows {first['train_rows']}, test rows scored "
            f"{first['test_rows_scored']}, {first['labels']} labels, {SITES} sites "
            f"({how} split); accuracy and macro-F1: mean ± half the range over seeds; "
            "minutes: mean per row (training, scoring); epsilon: max over sites and seeds\n"
        )
        out.append(
            table(
                [
                    "run",
                    "extra overrides",
                    "seeds",
                    "accuracy",
                    "macro-F1",
                    "train min",
                    "score min",
                    "epsilon",
                    "date (UTC)",
                    "commit",
                ],
                lines,
            )
        )
        out.append(
            "\nGoals (issue 14), from the untagged rows' mean accuracy; gap: accuracy points "
            "lost against centralized-nodp (first three), gained over head-dp-eps8 (last):\n"
        )
        out.append(table(["goal", "accuracy", "gap", "result"], goal_checks(dataset, groups)))
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags: which data sets, runs and seeds; ``--quick`` swaps in tiny settings."""
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument(
        "--runs",
        nargs="+",
        choices=list(RUNS),
        default=DEFAULT_RUNS,
        metavar="RUN",
        help=f"rows to train (default: {' '.join(DEFAULT_RUNS)}); choices: {', '.join(RUNS)}",
    )
    ap.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="seeds of every selected run (default: 0 1 for the DP rows, 0 for the others)",
    )
    ap.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra config override for every row (a study); rows are stored with its tag",
    )
    ap.add_argument("--tag", help="name the extra overrides' tag (default: derived from them)")
    ap.add_argument("--redo", action="store_true", help="train rows that are already stored")
    ap.add_argument("--table", action="store_true", help="print the table of stored rows only")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_TRAIN_ROWS} training rows, 1 round, {QUICK_TEST_ROWS} test rows, stored "
        f"apart (default --out {QUICK_OUT.relative_to(REPO)}): checks the pipeline",
    )
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT, help="default ../shared/data")
    ap.add_argument(
        "--out", type=Path, help=f"run artifacts (default {OUT.relative_to(REPO)})"
    )
    ap.add_argument(
        "--rows", type=Path, help=f"row store (default {ROWS.relative_to(REPO)}, committed)"
    )
    ap.add_argument("--work-dir", type=Path, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    ap.add_argument("--train-rows", type=int, help="use only N evenly spaced training rows")
    ap.add_argument("--test-rows", type=int, help="score only N evenly spaced test rows")
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="show fedslm's progress (default: -q)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.train_rows = args.train_rows or QUICK_TRAIN_ROWS
        args.test_rows = args.test_rows or QUICK_TEST_ROWS
    args.out = (args.out or (QUICK_OUT if args.quick else OUT)).resolve()
    args.rows = (args.rows or (args.out / "rows" if args.quick else ROWS)).resolve()
    if args.tag and not args.extra:
        ap.error("--tag names the extra --set overrides; give some")
    return args


def _scratch(args: argparse.Namespace) -> Path:
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="utility-"))
    if work == REPO or REPO in work.parents:
        raise SystemExit(f"--work-dir {work} is inside the repository; use a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    return work


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.utility``."""
    args = parse_args(argv)
    if args.table:
        print(format_tables(load_rows(args.rows)))
        return 0
    # rows on part of the data are studies too: their sizes join the tag (quick rows live apart)
    sized = [] if args.quick else [f"{k}={getattr(args, k)}" for k in ("train_rows", "test_rows")]
    tag = overrides_tag([*args.extra, *[x for x in sized if not x.endswith("=None")]], args.tag)
    failed: list[str] = []
    work = _scratch(args)
    try:
        for name in args.dataset:
            todo = []
            for run in args.runs:
                seeds = args.seeds or ([0, 1] if RUNS[run].multi_seed else [0])
                for seed in seeds:
                    path = args.rows / name / f"{row_stem(run, seed, tag)}.json"
                    if path.exists() and not args.redo:
                        print(f"[{name}/{run} seed {seed}] stored: {path}", file=sys.stderr)
                    else:
                        todo.append((run, seed, path))
            if not todo:
                continue
            scratch = work / name
            scratch.mkdir(exist_ok=True)
            data = subset(
                DATASETS[name](args.data_root.resolve(), scratch), scratch, args.train_rows
            )
            for run, seed, path in todo:
                t = time.perf_counter()
                try:
                    row = train_row(data, run, seed, args.extra, tag, args, scratch)
                except RowFailed as exc:
                    failed.append(f"{name}/{path.stem}")
                    print(f"[{name}/{run} seed {seed}] FAILED: {exc}", file=sys.stderr)
                    continue
                write_json(path, row)
                s = row["scores"]
                eps = row["epsilon"]
                print(
                    f"[{name}/{run} seed {seed}] accuracy {s['test_accuracy']:.4f}, macro-F1 "
                    f"{s['test_macro_f1']:.4f}, epsilon {'-' if eps is None else f'{eps:.2f}'}, "
                    f"train {row['train_seconds']:.0f} s, score {row['score_seconds']:.0f} s, "
                    f"row {time.perf_counter() - t:.0f} s -> {path}",
                    file=sys.stderr,
                )
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print(format_tables(load_rows(args.rows), args.dataset))
    if failed:
        print(f"failed rows (not stored): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
