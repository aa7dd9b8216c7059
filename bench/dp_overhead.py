"""DP-SGD step time ÷ non-DP step time on the default model (goal: ≤ 1.2 on CPU).

Two models are built the way a fedslm site builds them (``load_model`` with the same seed; the
DP one wrapped by ``per_sample_module``, its optimizer by ``dp_optimizer``). Both take full
steps (forward, per-example loss, backward, optimizer step) on the same fixed batches of
synthetic bank messages. DP and non-DP steps alternate (a pair: one of each, back to back,
order swapped every pair), so load from another process hits both sides alike; a pair during
which other processes were busy is dropped and redone (the machine is shared). The first steps
are warm-up and not timed; medians are reported.

    python -m bench.dp_overhead [--steps 20] [--warmup 3] [--threads 2 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import OtherLoad, machine, median, spread, table, wait_for_quiet, write_json
from fedslm.batching import Encoded, collate, encode_classification
from fedslm.config import LoraConfig, ModelConfig
from fedslm.data import INTENTS, generate_bank_messages
from fedslm.losses import per_example_loss
from fedslm.models import load_model, resolve_model
from fedslm.privacy.dp_sgd import dp_optimizer, per_sample_module
from fedslm.training import make_optimizer

# The default model as the demo runs it: minilm, classification, LoRA r=8 on query,value,
# batch 32, max_length 48; the learning rate is the config default (it does not change timing).
BATCH = 32
MAX_LENGTH = 48
LR = 0.005
SEED = 0


@dataclass
class Side:
    """One side of the ratio: a model and its optimizer, ready to step."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def build_sides(labels: list[str]) -> tuple[Side, Side]:
    """The DP and the non-DP model with their optimizers, built in fedslm's order."""
    path = resolve_model(ModelConfig(name="minilm")).path
    lora = LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    cpu = torch.device("cpu")
    sides = []
    for dp in (True, False):
        loaded = load_model(path, "classification", lora, labels, cpu, seed=SEED)
        model = per_sample_module(loaded.model) if dp else loaded.model
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, "adamw", LR, 0.0)
        if dp:
            # noise on, as in a real run: its cost (one randn per trainable tensor) is part of DP
            gen = torch.Generator().manual_seed(SEED + 1)
            opt = dp_optimizer(opt, 1.0, 1.0, BATCH, gen)
        model.train()
        sides.append(Side("DP-SGD" if dp else "non-DP", model, opt))
    return sides[0], sides[1]


def fixed_batches(n_batches: int) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """``n_batches`` batches of exactly ``BATCH`` synthetic messages, tokenised once."""
    rows = generate_bank_messages(["site-1"], BATCH * n_batches, seed=SEED)
    labels = list(INTENTS)
    path = resolve_model(ModelConfig(name="minilm")).path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    data: Encoded = encode_classification(
        tok,
        [r["text"] for r in rows],
        [r["label"] for r in rows],
        {label: i for i, label in enumerate(labels)},
        MAX_LENGTH,
    )
    cpu = torch.device("cpu")
    batches = [collate(data, list(range(i, i + BATCH)), cpu) for i in range(0, len(data), BATCH)]
    return labels, batches


def step(side: Side, batch: dict[str, torch.Tensor]) -> float:
    """One full training step; returns its wall time in seconds."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    start = time.perf_counter()
    side.optimizer.zero_grad(set_to_none=True)
    loss = per_example_loss(side.model(**inputs).logits, labels).mean()
    loss.backward()
    side.optimizer.step()
    float(loss.detach())  # the training loop reads the loss every step too
    return time.perf_counter() - start


@dataclass
class Timings:
    """Step times in ms per side, for the pairs kept, and what was thrown away."""

    dp_ms: list[float]
    plain_ms: list[float]
    pair_loads: list[float | None]  # others' CPU (cores) during each kept pair
    discarded: int  # pairs dropped because another process was busy meanwhile


def measure(
    dp: Side,
    plain: Side,
    batches: list[dict[str, torch.Tensor]],
    warmup: int,
    steps: int,
    quiet: float,
    budget: float,
) -> Timings:
    """``steps`` pairs (one DP, one non-DP step on the same batch, order swapped every pair).

    The machine is shared: a pair during which other processes used more than ``quiet`` cores
    is dropped and redone, until ``steps`` quiet pairs are in or ``budget`` seconds have passed
    (then the busy pairs are kept too, and the table says so).
    """
    for i in range(warmup):
        for side in (dp, plain):
            step(side, batches[i % len(batches)])
    kept: list[tuple[float, float, float | None]] = []
    busy: list[tuple[float, float, float | None]] = []
    deadline = time.monotonic() + budget
    i = 0
    while len(kept) < steps:
        batch = batches[i % len(batches)]
        with OtherLoad() as load:
            if i % 2 == 0:  # neither side always goes first
                t_dp, t_plain = step(dp, batch), step(plain, batch)
            else:
                t_plain, t_dp = step(plain, batch), step(dp, batch)
        pair = (t_dp * 1e3, t_plain * 1e3, load.cores)
        (busy if load.cores is not None and load.cores > quiet else kept).append(pair)
        i += 1
        if time.monotonic() > deadline and len(kept) + len(busy) >= steps:
            # out of time: fill up with the least disturbed of the busy pairs
            kept += sorted(busy, key=lambda b: b[2] or 0.0)[: steps - len(kept)]
            break
    return Timings([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept], i - len(kept))


def run(
    steps: int, warmup: int, threads: list[int], max_wait: float, quiet: float, budget: float
) -> dict:
    """Measure every thread setting; print the table and return the raw results."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    labels, batches = fixed_batches(8)
    dp, plain = build_sides(labels)
    results = []
    default_threads = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        wait_for_quiet(max_wait, threshold=quiet)
        t = measure(dp, plain, batches, warmup, steps, quiet, budget)
        loads = [x for x in t.pair_loads if x is not None]
        results.append(
            {
                "threads": n,
                "dp_ms": t.dp_ms,
                "nodp_ms": t.plain_ms,
                "dp_median_ms": median(t.dp_ms),
                "nodp_median_ms": median(t.plain_ms),
                "ratio": median(t.dp_ms) / median(t.plain_ms),
                # each pair ran back to back, so its ratio sees the same machine state
                "pair_ratio_median": median(
                    [a / b for a, b in zip(t.dp_ms, t.plain_ms, strict=True)]
                ),
                "other_load_cores_max": max(loads) if loads else None,
                "pairs_discarded": t.discarded,
            }
        )
    torch.set_num_threads(default_threads)  # leave the process as it was found
    print(
        f"DP-SGD overhead: minilm, LoRA r=8 query,value, batch {BATCH}, max_length "
        f"{MAX_LENGTH}, {steps} timed pairs after {warmup} warm-up (goal ratio <= 1.2)"
    )
    print(format_table(results))
    return {
        "benchmark": "dp_overhead",
        "machine": machine(),
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "steps": steps,
        "warmup": warmup,
        "quiet_threshold_cores": quiet,
        "results": results,
    }


def format_table(results: list[dict]) -> str:
    """The Markdown table of ``run``'s results."""
    headers = [
        "torch threads",
        "DP ms/step (median)",
        "DP range",
        "non-DP ms/step (median)",
        "non-DP range",
        "ratio of medians",
        "median of pair ratios",
        "foreign CPU, max (cores)",
        "disturbed pairs dropped",
    ]
    rows = [
        [
            r["threads"],
            r["dp_median_ms"],
            spread(r["dp_ms"]),
            r["nodp_median_ms"],
            spread(r["nodp_ms"]),
            r["ratio"],
            r["pair_ratio_median"],
            "n/a" if r["other_load_cores_max"] is None else f"{r['other_load_cores_max']:.2f}",
            r["pairs_discarded"],
        ]
        for r in results
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.dp_overhead``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed pairs (one step per side)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch thread counts")
    ap.add_argument(
        "--max-wait", type=float, default=300, help="seconds to wait for a quiet machine first"
    )
    ap.add_argument(
        "--quiet", type=float, default=0.25, help="most cores other processes may use in a pair"
    )
    ap.add_argument(
        "--budget", type=float, default=600, help="seconds per thread setting to find quiet pairs"
    )
    ap.add_argument("--json", type=Path, help="also write the raw timings here")
    args = ap.parse_args(argv)
    result = run(args.steps, args.warmup, args.threads, args.max_wait, args.quiet, args.budget)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
