"""Aggregation time and peak memory for 10 and 100 site updates of ~1M adapter parameters.

The layout is a realistic LoRA adapter: 12 layers x (query, value) of width 1024, rank 20, plus
a 10-label classification head (993,290 parameters, 4 MB as float32). Updates come from a
generator, as the coordinator decodes them one reply at a time; each is a fresh copy of one of
four pre-built random states, so producing it costs a memcpy (timed separately as "source").

Each (rule, site count) cell runs in its own process: a warm-up aggregation of a tiny adapter,
then the peak-RSS counter is reset (``/proc/self/clear_refs``) and the rule aggregates N
updates ``--repeats`` times. "Peak RSS growth" is the high-water mark above the RSS before the
first timed run: it must not grow with N for a streamed rule. Times are medians.

    python -m bench.aggregation_throughput [--counts 10 100] [--repeats 3] [--threads 1]
                                           [--rules fedavg-factors ffa exact] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import OtherLoad, machine, median, table, wait_for_quiet, write_json

LAYERS, WIDTH, RANK, ALPHA, LABELS = 12, 1024, 20, 40.0, 10
POOL = 4
# federation.aggregation names (the results of 2026-11-21 in docs/benchmarks.md call the first
# one "fedavg")
RULES = ("fedavg-factors", "ffa", "exact")


def layout() -> dict[str, tuple[int, ...]]:
    """Tensor names (PEFT's, for a BERT-style model) and shapes of one adapter update."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(LAYERS):
        for proj in ("query", "value"):
            name = f"base_model.model.bert.encoder.layer.{i}.attention.self.{proj}"
            shapes[f"{name}.lora_A.weight"] = (RANK, WIDTH)
            shapes[f"{name}.lora_B.weight"] = (WIDTH, RANK)
    shapes["base_model.model.classifier.weight"] = (LABELS, WIDTH)
    shapes["base_model.model.classifier.bias"] = (LABELS,)
    return shapes


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert match, field
    return int(match.group(1))


def child(rule: str, count: int, repeats: int, threads: int) -> dict[str, Any]:
    """Measure one cell in this process; returns its numbers."""
    import torch

    from fedslm.aggregation import exact, fedavg, ffa

    torch.set_num_threads(threads)

    def make_pool(shapes: dict[str, tuple[int, ...]]) -> list[dict[str, torch.Tensor]]:
        pool = []
        for seed in range(POOL):
            g = torch.Generator().manual_seed(seed)
            pool.append({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()})
        for state in pool[1:]:  # ffa needs one frozen A shared by every site
            state.update({k: pool[0][k] for k in state if ".lora_A." in k})
        return pool

    def updates(n: int) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        for i in range(n):
            yield {k: v.clone() for k, v in pool[i % POOL].items()}, float(100 + i)

    def run(n: int) -> None:
        if rule == "fedavg-factors":  # the math of federation.aggregation fedavg-factors
            out = fedavg(updates(n))
        elif rule == "ffa":
            out = ffa(updates(n))
        else:
            out = exact(((s, w, ALPHA) for s, w in updates(n)), RANK, ALPHA).state
        assert all(torch.isfinite(t).all() for t in out.values())

    # Warm-up on a tiny layout: BLAS and LAPACK initialise, but no full-size buffer is freed
    # into the allocator's cache beforehand (that would hide the first run's peak).
    pool = make_pool({f"l{i}.lora_{f}.weight": (RANK, RANK) for i in range(2) for f in "AB"})
    run(2)
    pool = make_pool(layout())
    start = time.perf_counter()
    for _ in updates(count):
        pass
    source = time.perf_counter() - start
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
    before = _status_kb("VmRSS")
    seconds = []
    with OtherLoad() as load:
        for _ in range(repeats):
            start = time.perf_counter()
            run(count)
            seconds.append(time.perf_counter() - start)
    return {
        "rule": rule,
        "updates": count,
        "params": sum(t.numel() for t in pool[0].values()),
        "seconds": seconds,
        "source_seconds": source,
        "peak_rss_growth_mb": (_status_kb("VmHWM") - before) / 1024,
        "other_load_cores": load.cores,
    }


def run(
    rules: list[str], counts: list[int], repeats: int, threads: int, max_wait: float
) -> dict[str, Any]:
    """Every cell in its own process; prints the table and returns the raw results."""
    results = []
    for rule in rules:
        for count in counts:
            wait_for_quiet(max_wait)
            cmd = [sys.executable, "-m", "bench.aggregation_throughput", "--child", rule]
            cmd += [str(count), "--repeats", str(repeats), "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"Aggregation of N updates of {results[0]['params']:,} parameters ({LAYERS} layers x "
        f"query,value, width {WIDTH}, LoRA r={RANK}, + head), streamed from a generator; "
        f"torch threads {threads}, median of {repeats}"
    )
    print(format_table(results, counts))
    return {
        "benchmark": "aggregation_throughput",
        "machine": machine(),
        "child_torch_threads": threads,
        "repeats": repeats,
        "results": results,
    }


def format_table(results: list[dict[str, Any]], counts: list[int]) -> str:
    """The Markdown table, with each rule's time and memory relative to its smallest N.

    "Marginal ms / update" is the time one more update adds (from the next smaller N), which
    separates the per-update cost from a fixed per-round cost such as exact's SVDs. "N updates
    held" is what keeping every update in memory would take, for scale.
    """
    smallest = min(counts)
    by_cell = {(r["rule"], r["updates"]): r for r in results}
    rows = []
    for r in results:
        t, base = median(r["seconds"]), by_cell[(r["rule"], smallest)]
        smaller = [n for n in counts if n < r["updates"]]
        if smaller:
            prev = by_cell[(r["rule"], max(smaller))]
            marginal = (
                f"{1e3 * (t - median(prev['seconds'])) / (r['updates'] - prev['updates']):.3g}"
            )
        else:
            marginal = ""
        load = r["other_load_cores"]
        rows.append(
            [
                r["rule"],
                r["updates"],
                t,
                marginal,
                1e3 * r["source_seconds"] / r["updates"],
                r["peak_rss_growth_mb"],
                r["updates"] * r["params"] * 4 / 2**20,
                f"{t / median(base['seconds']):.2f}",
                f"{r['peak_rss_growth_mb'] / base['peak_rss_growth_mb']:.2f}",
                "n/a" if load is None else f"{load:.2f}",
            ]
        )
    headers = [
        "rule",
        "updates",
        "seconds",
        "marginal ms / update",
        "source ms / update",
        "peak RSS growth (MB)",
        "N updates held (MB)",
        f"time vs {smallest}",
        f"peak RSS vs {smallest}",
        "foreign CPU (cores)",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.aggregation_throughput``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 100], help="site counts")
    ap.add_argument(
        "--rules",
        nargs="+",
        choices=RULES,
        default=list(RULES),
        help="federation.aggregation rules to time",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed aggregations per cell")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (coordinator side)")
    ap.add_argument(
        "--max-wait", type=float, default=120, help="seconds to wait for a quiet machine per cell"
    )
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", nargs=2, metavar=("RULE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        rule, count = args.child
        print(json.dumps(child(rule, int(count), args.repeats, args.threads)))
        return 0
    result = run(args.rules, args.counts, args.repeats, args.threads, args.max_wait)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
