"""Gemma 3 270M by label words: zero-shot, centralized non-DP and federated DP (issue 17).

A real pretrained generative small model (``model.name: gemma3-270m``, the optional extra
``fedslm[gemma]``) instruction-tuned with fedslm to answer a classification question with the
label's name (``task.classifier: label-words``), on two public data sets read in place from
``--data-root`` (default ``../shared/data``) and prepared exactly as ``bench/utility.py`` does:

    medical    medical abstracts -> condition name (5), its 80/20 stratified split (seed 14)
    twitter    financial tweets -> bearish / bullish / neutral, sent_train / sent_valid

The machine has 2 shared cores and the model has 268M parameters, so the rows are small and
say so: ``TRAIN_ROWS`` evenly spaced training rows (3 sites, an iid split: 32 training and 8
held-out rows each),
``TEST_ROWS`` evenly spaced test rows, ``train.max_length`` ``MAX_LENGTH`` (a medical abstract
is cut at its end to fit; the question and the labels always fit). Rows:

    zero-shot             the base model (LoRA at its no-op start), label words, no training
    step-time             one LoRA step on 8 rows, DP (Opacus hooks, noise on) and non-DP
    centralized-nodp      fedslm centralized, no DP
    federated-dp-eps8     fedslm simulate, 3 sites, record-level DP at epsilon 8
    minilm-centralized-nodp, minilm-federated-dp-eps8
                          the packaged MiniLM at the job defaults (the DP linear probe) on the
                          same rows, scored as bench/utility.py scores it

Scores on the test rows: label-word accuracy and macro-F1 (``fedslm.labelwords``: the label
whose response has the highest mean token log-probability) and the perplexity of the gold
responses (exp of their mean per-token loss, the training loss); MiniLM: accuracy and macro-F1
of its head. Each row runs in its own process (its peak RSS is the row's own) and is written
at once to ``ROWS/DATASET/RUN.json``; a stored row is skipped unless ``--redo``, so the table
is built across sittings. ``--table`` prints the Markdown table of the stored rows.

    nice python -m bench.gemma                       # every row not stored yet, zero-shot first
    nice python -m bench.gemma --dataset twitter --runs zero-shot
    python -m bench.gemma --table
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, machine, table, write_json
from bench.utility import (
    DATA_ROOT,
    DATASETS,
    Dataset,
    RowFailed,
    git_commit,
    privacy_summary,
    run_fedslm,
    subset,
)
from bench.utility_eval import score_adapter, spaced

ROWS = REPO / "bench" / "results" / "gemma"
OUT = REPO / "runs" / "bench-gemma"
SITES = 3
TRAIN_ROWS = 120
TEST_ROWS = {"medical": 100, "twitter": 150}
MAX_LENGTH = 128
ROUNDS = 2
RUNS = (
    "zero-shot",
    "step-time",
    "minilm-centralized-nodp",
    "minilm-federated-dp-eps8",
    "centralized-nodp",
    "federated-dp-eps8",
)
# LoRA r 8 on q/v, AdamW, 2 rounds of 1 local epoch; non-DP: batch 16 at lr 2e-3; DP: Poisson
# batches of 16 expected rows (q = 0.5 of a site's 32 training records) at lr 2e-3, clip 1, eps 8
GEMMA = {
    "model": {"name": "gemma3-270m"},
    "task": {"type": "classification", "classifier": "label-words"},
    "lora": {"r": 8, "alpha": 16},
    "train": {"local_epochs": 1, "physical_batch_size": 8, "max_length": MAX_LENGTH},
    "federation": {"rounds": ROUNDS},
}
SETTINGS = {
    "centralized-nodp": (
        "centralized",
        ["privacy.enabled=false", "train.batch_size=16", "train.learning_rate=2e-3"],
    ),
    "federated-dp-eps8": (
        "simulate",
        ["privacy.target_epsilon=8", "train.batch_size=16", "train.learning_rate=2e-3"],
    ),
    "minilm-centralized-nodp": ("centralized", ["privacy.enabled=false"]),
    "minilm-federated-dp-eps8": ("simulate", ["privacy.target_epsilon=8"]),
}
NO_DP_POLICY = "policy.default.privacy.allow_no_dp=true"


# --------------------------------------------------------------------------------------------
# Data


def prepare(name: str, root: Path, scratch: Path) -> tuple[Dataset, Path]:
    """The data set with ``TRAIN_ROWS`` training rows, and a file of its ``TEST_ROWS`` test
    rows (evenly spaced: the files are sorted by label, so a prefix would hold few labels)."""
    scratch.mkdir(parents=True, exist_ok=True)
    data = subset(DATASETS[name](root, scratch), scratch, TRAIN_ROWS)
    with data.test.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cols = [data.text_column, data.label_column]
    test = scratch / f"{name}-test-{TEST_ROWS[name]}.csv"
    with test.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({c: rows[i][c] for c in cols} for i in spaced(len(rows), TEST_ROWS[name]))
    return data, test


def job_config(data: Dataset, run: str) -> dict[str, Any]:
    """The written job config of a row (its ``--set`` overrides come on top)."""
    base = {} if run.startswith("minilm") else json.loads(json.dumps(GEMMA))
    return base | {
        "seed": 0,
        "federation": {**base.get("federation", {}), "sites": SITES},
        "data": {
            "path": str(data.train),
            # iid: a Dirichlet(0.5) split of so few rows leaves a site below the default
            # policy's 20 training records (measured: 17 of 150 on the tweets)
            "split": {"method": "iid"},
            "text_column": data.text_column,
            "label_column": data.label_column,
            "labels": data.labels,
        },
    }


# --------------------------------------------------------------------------------------------
# Scoring


def gemma_path() -> Path:
    """The dequantised Gemma 3 270M folder (built on first use)."""
    from fedslm.config import ModelConfig
    from fedslm.models.registry import resolve_model

    return resolve_model(ModelConfig(name="gemma3-270m")).path


def score_label_words(
    model, tokenizer, template, labels: list[str], prompt: str, test: Path, data: Dataset
) -> dict[str, Any]:
    """Label-word accuracy, macro-F1 and gold-response perplexity on the test file."""
    import torch

    from fedslm.data import read_examples
    from fedslm.labelwords import LabelWords, evaluate_label_words

    words = LabelWords(tokenizer, labels, template, prompt, MAX_LENGTH)
    ex = read_examples(test, data.text_column, data.label_column, labels=labels)
    encoded = words.encode(ex.texts, ex.labels)
    r = evaluate_label_words(model, words, encoded, torch.device("cpu"))
    counts = [r.predictions.count(k) for k in range(len(labels))]
    return {
        "test_accuracy": r.accuracy,
        "test_macro_f1": r.macro_f1,
        "test_loss": r.loss,
        "test_perplexity": r.perplexity,
        "test_examples": r.examples,
        "top_prediction_share": max(counts) / max(r.examples, 1),
        "prediction_counts": dict(zip(labels, counts, strict=True)),
    }


def zero_shot(data: Dataset, test: Path) -> dict[str, Any]:
    """The base model by label words: LoRA at its no-op initialisation, nothing trained."""
    import torch

    from fedslm.config import LABEL_PROMPT, LoraConfig
    from fedslm.models import load_model

    loaded = load_model(
        gemma_path(), "causal-lm", LoraConfig(), data.labels, torch.device("cpu"), seed=0
    )
    t = time.perf_counter()
    scores = score_label_words(
        loaded.model,
        loaded.tokenizer,
        loaded.prompt_template,
        data.labels,
        LABEL_PROMPT,
        test,
        data,
    )
    return {"scores": scores, "score_seconds": time.perf_counter() - t}


def step_time(data: Dataset, test: Path) -> dict[str, Any]:
    """Seconds of one LoRA step on 8 training rows at ``MAX_LENGTH``, non-DP and DP (noise
    on), after one warm-up step each; the median of 3."""
    import statistics

    import torch

    from fedslm.config import LABEL_PROMPT, LoraConfig
    from fedslm.data import read_examples
    from fedslm.labelwords import LabelWords
    from fedslm.models import load_model
    from fedslm.privacy.dp_sgd import per_sample_module
    from fedslm.training import DPSettings, make_optimizer, train_steps

    loaded = load_model(
        gemma_path(), "causal-lm", LoraConfig(), data.labels, torch.device("cpu"), seed=0
    )
    words = LabelWords(
        loaded.tokenizer, data.labels, loaded.prompt_template, LABEL_PROMPT, MAX_LENGTH
    )
    ex = read_examples(data.train, data.text_column, data.label_column, labels=data.labels)
    batch = words.encode(ex.texts[:8], ex.labels[:8]).encoded
    lengths = [len(x) for x in batch.input_ids]
    out: dict[str, Any] = {"rows": 8, "tokens_per_row": statistics.mean(lengths)}
    for name, dp in (("nodp", None), ("dp", DPSettings(1.0, 1.0, 8))):
        module = loaded.model if dp is None else per_sample_module(loaded.model)
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        times = []
        for i in range(4):
            opt = make_optimizer(params, "adamw", 1e-4, 0.0)
            r = train_steps(
                module,
                batch,
                steps=1,
                sample_rate=1.0,
                optimizer=opt,
                device=torch.device("cpu"),
                dp=dp,
                seed=i,
            )
            times.append(r.seconds)
        out[f"{name}_seconds"] = statistics.median(times[1:])
        out[f"{name}_all_seconds"] = times
        if dp is not None:
            module._close()
    return {"step_time": out}


def train_and_score(data: Dataset, test: Path, run: str, scratch: Path) -> dict[str, Any]:
    """Train the row with the fedslm command line, then score its exported adapter."""
    from fedslm.config import load_config

    command, overrides = SETTINGS[run]
    config = scratch / f"{run}.yaml"
    written = job_config(data, run)
    config.write_text(yaml.safe_dump(written, sort_keys=False))
    if "privacy.enabled=false" in overrides:
        overrides = [*overrides, NO_DP_POLICY]
    resolved = load_config(config, overrides).model_dump(mode="json")
    run_dir = scratch / "run"
    cmd = [sys.executable, "-m", "fedslm.cli", command, str(config), "--out", str(run_dir)]
    cmd += ["--overwrite", "-q", *[a for o in overrides for a in ("--set", o)]]
    ledgers = Path(tempfile.mkdtemp(prefix="ledgers-", dir=scratch))
    train_seconds, tail = run_fedslm(cmd, ledgers)
    keep = OUT / "artifacts" / data.name / run
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    shutil.copytree(run_dir / "adapter", keep / "adapter")
    for f in ("metrics.jsonl", "privacy.json"):
        shutil.copy2(run_dir / f, keep / f)
    metrics = [json.loads(x) for x in (keep / "metrics.jsonl").read_text().splitlines() if x]
    t = time.perf_counter()
    if run.startswith("minilm"):
        scores = score_adapter(keep / "adapter", test, None, data.text_column, data.label_column)
    else:
        from fedslm.models.adapter import load_exported

        meta = json.loads((keep / "adapter" / "fedslm_adapter.json").read_text())
        base = gemma_path()
        tokenizer, template = tokenizer_and_template(base)
        model = load_exported(keep / "adapter", base)
        scores = score_label_words(
            model,
            tokenizer,
            template,
            data.labels,
            meta["label_prompt"],
            test,
            data,
        )
    return {
        "command": ["fedslm", *cmd[3:]],
        "overrides": overrides,
        "config": written,
        "resolved_config": resolved,
        "train_seconds": train_seconds,
        "score_seconds": time.perf_counter() - t,
        "fedslm_stderr_tail": tail,
        "privacy": privacy_summary(json.loads((keep / "privacy.json").read_text())),
        "site_rounds": _site_rounds(metrics),
        "scores": scores,
        "artifacts": str(keep.relative_to(REPO)),
    }


def tokenizer_and_template(base: Path):  # -> (tokenizer, PromptTemplate)
    """The tokenizer (pad token set) and prompt template exactly as training had them."""
    from transformers import AutoTokenizer

    from fedslm.config import LoraConfig
    from fedslm.models.families import resolve_defaults

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    config = json.loads((base / "config.json").read_text())
    defaults = resolve_defaults(
        config["model_type"], "causal-lm", tokenizer, LoraConfig(), None, base
    )
    return tokenizer, defaults.prompt_template


def _site_rounds(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: each site's steps and training seconds, and the mean step time."""
    out = []
    for m in metrics:
        sites = m.get("sites") or {}
        steps = sum(s.get("steps") or 0 for s in sites.values())
        seconds = sum(s.get("seconds") or 0.0 for s in sites.values())
        out.append(
            {
                "round": m.get("round"),
                "steps": steps,
                "train_seconds": seconds,
                "seconds_per_step": seconds / steps if steps else None,
                "eval_accuracy": m.get("eval_accuracy"),
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Rows


def run_row(name: str, run: str, root: Path, path: Path) -> None:
    """Measure one row in this process and store it (``RowFailed`` if it cannot)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"gemma-{name}-"))
    try:
        data, test = prepare(name, root, scratch)
        start = time.perf_counter()
        if run == "zero-shot":
            result = zero_shot(data, test)
        elif run == "step-time":
            result = step_time(data, test)
        else:
            result = train_and_score(data, test, run, scratch)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {
        "dataset": name,
        "run": run,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "bench_command": f"python -m bench.gemma --dataset {name} --runs {run} --redo",
        "data": {
            **data.info,
            "train_rows": TRAIN_ROWS,
            "test_rows": TEST_ROWS[name],
            "labels": data.labels,
            "sites": SITES,
            "max_length": MAX_LENGTH,
        },
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime,
        # ru_maxrss is in KiB on Linux; children: the largest process this row waited for
        "peak_rss_mb": max(usage.ru_maxrss, children.ru_maxrss) / 1024,
        "machine": machine(),
        **result,
    }
    write_json(path, row)


def load_rows(rows: Path) -> list[dict[str, Any]]:
    """Every stored row."""
    return [json.loads(p.read_text()) for p in sorted(rows.glob("*/*.json"))]


def format_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown table of the stored rows (step-time rows in a table of their own)."""
    body, steps = [], []
    for r in rows:
        if r["run"] == "step-time":
            s = r["step_time"]
            steps.append(
                [
                    r["dataset"],
                    s["rows"],
                    round(s["tokens_per_row"], 1),
                    s["nodp_seconds"],
                    s["dp_seconds"],
                    s["dp_seconds"] / s["nodp_seconds"],
                    round(r["peak_rss_mb"]),
                    r["date"][:10],
                ]
            )
            continue
        s = r["scores"]
        eps = (r.get("privacy") or {}).get("epsilon")
        per_step = [x["seconds_per_step"] for x in r.get("site_rounds", []) if x.get("steps")]
        body.append(
            [
                r["dataset"],
                r["run"],
                s["test_accuracy"],
                s["test_macro_f1"],
                s.get("test_perplexity", "—"),
                "—" if eps is None else round(eps, 2),
                "—" if not per_step else round(sum(per_step) / len(per_step), 2),
                round(r["wall_seconds"]),
                round(r["cpu_seconds"]),
                round(r["peak_rss_mb"]),
                r["date"][:10],
            ]
        )
    out = [
        table(
            [
                "data set",
                "row",
                "accuracy",
                "macro-F1",
                "perplexity",
                "epsilon",
                "s/step",
                "wall s",
                "CPU s",
                "peak MB",
                "date",
            ],
            body,
        )
    ]
    if steps:
        out.append(
            table(
                [
                    "data set",
                    "rows",
                    "tokens/row",
                    "non-DP s/step",
                    "DP s/step",
                    "DP/non-DP",
                    "peak MB",
                    "date",
                ],
                steps,
            )
        )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.gemma``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", nargs="+", choices=["twitter", "medical"])
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    ap.add_argument("--redo", action="store_true", help="measure rows already stored")
    ap.add_argument("--table", action="store_true", help="print the stored rows only")
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT)
    ap.add_argument("--rows", type=Path, default=ROWS, help="row store (committed)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a row's process
    args = ap.parse_args(argv)
    if args.table:
        print(format_table(load_rows(args.rows)))
        return 0
    datasets = args.dataset or ["twitter", "medical"]
    if args.one:
        path = args.rows / datasets[0] / f"{args.runs[0]}.json"
        try:
            run_row(datasets[0], args.runs[0], args.data_root.resolve(), path)
        except RowFailed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        return 0
    failed = []
    # zero-shot of every data set first: some figures exist early
    for run in args.runs:
        for name in datasets:
            path = args.rows / name / f"{run}.json"
            if path.exists() and not args.redo:
                print(f"[{name}/{run}] stored: {path}", file=sys.stderr)
                continue
            print(f"[{name}/{run}] measuring", file=sys.stderr)
            cmd = [sys.executable, "-m", "bench.gemma", "--one", "--dataset", name]
            cmd += ["--runs", run, "--rows", str(args.rows), "--data-root", str(args.data_root)]
            t = time.perf_counter()
            code = subprocess.run(cmd, cwd=REPO, env=os.environ.copy()).returncode
            if code:
                failed.append(f"{name}/{run}")
            print(f"[{name}/{run}] exit {code}, {time.perf_counter() - t:.0f} s", file=sys.stderr)
    print(format_table(load_rows(args.rows)))
    if failed:
        print(f"failed rows (not stored): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
