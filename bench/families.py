"""Per model family, on CPU: DP-SGD step vs non-DP step (time and peak memory), tiny models.

For every family's tiny model (``tiny-<model_type>``: 2 layers, hidden 64, random weights) two
copies are built the way a fedslm site builds them (``load_model``, same seed; the DP one
wrapped by ``per_sample_module``, its optimizer by ``dp_optimizer``, noise on). Encoders train
as classifiers, decoders as causal LMs with their family's prompt template. Steps are timed in
DP/non-DP pairs on the same fixed batches, order swapped every pair, disturbed pairs redone
(``bench.dp_overhead.measure``), so the ratio is measured in one run under one machine state.

Memory is the peak of tensor memory during one step (PyTorch's CPU allocator, read with the
profiler) plus what the model and optimizer hold before it; it is compared with
``fedslm.models.memory.estimate_site_memory`` for the same shape, batch and sequence length.
Tiny models say little about absolute speed; the ratio and the memory split are the point.

    python -m bench.families [--steps 10] [--warmup 2] [--batch 32] [--families gpt2 llama]
    python -m bench.families --memory-table   # the site-memory tables of docs/models.md
    python -m bench.families --family-table   # the family table of docs/models.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

from bench.common import machine, median, spread, table, wait_for_quiet, write_json
from bench.dp_overhead import Side, measure
from fedslm.batching import collate, encode_classification, encode_instructions
from fedslm.config import LoraConfig, ModelConfig
from fedslm.data import INTENTS, generate_bank_messages
from fedslm.losses import per_example_loss
from fedslm.models import load_model, resolve_model
from fedslm.models.families import FAMILIES, family_rows
from fedslm.models.memory import architecture_from_config, estimate_site_memory, markdown_tables
from fedslm.privacy.dp_sgd import dp_optimizer, per_sample_module
from fedslm.training import make_optimizer

MAX_LENGTH = 48
LR = 0.005
SEED = 0
MB = 1e6
FAMILY_HEADERS = [
    "model_type",
    "family",
    "tasks",
    "LoRA targets",
    "classification head",
    "plain template (no chat template)",
    "notes",
]


def build_sides(path: Path, task: str, labels: list[str], batch: int) -> tuple[Side, Side, object]:
    """DP and non-DP model with optimizers, in fedslm's build order; and the loaded model."""
    lora = LoraConfig(r=8, alpha=16)
    cpu = torch.device("cpu")
    sides, first = [], None
    for dp in (True, False):
        loaded = load_model(path, task, lora, labels, cpu, seed=SEED)
        first = first or loaded
        model = per_sample_module(loaded.model) if dp else loaded.model
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, "adamw", LR, 0.0)
        if dp:
            gen = torch.Generator().manual_seed(SEED + 1)
            opt = dp_optimizer(opt, 1.0, 1.0, batch, gen)
        model.train()
        sides.append(Side("DP-SGD" if dp else "non-DP", model, opt))
    return sides[0], sides[1], first


def fixed_batches(loaded, task: str, batch: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of exactly ``batch`` synthetic rows, encoded for this model."""
    rows = generate_bank_messages(["site-1"], batch * n_batches, seed=SEED)
    tok = loaded.tokenizer
    if task == "classification":
        data = encode_classification(
            tok,
            [r["text"] for r in rows],
            [r["label"] for r in rows],
            {label: i for i, label in enumerate(INTENTS)},
            MAX_LENGTH,
        )
    else:
        data = encode_instructions(
            tok,
            [r["prompt"] for r in rows],
            [r["response"] for r in rows],
            MAX_LENGTH,
            loaded.prompt_template,
        )
    cpu = torch.device("cpu")
    return [collate(data, list(range(i, i + batch)), cpu) for i in range(0, len(data), batch)]


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def resident_bytes(side: Side) -> int:
    """What the model and its optimizer hold between steps (weights, buffers, AdamW state)."""
    model = side.model
    tensors = [*model.parameters(), *model.buffers()]
    inner = getattr(side.optimizer, "original_optimizer", side.optimizer)
    for state in inner.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _tensor_bytes(tensors)


def step_peak_bytes(side: Side, batch: dict[str, torch.Tensor]) -> int:
    """Peak tensor memory allocated during one full step, above what was held before it."""
    from torch.profiler import ProfilerActivity, profile

    inputs = dict(batch)
    labels = inputs.pop("labels")
    side.optimizer.zero_grad(set_to_none=True)  # last step's grads (and grad samples) freed
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = per_example_loss(side.model(**inputs).logits, labels).mean()
        loss.backward()
        side.optimizer.step()
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def run_family(
    model_type: str, batch: int, steps: int, warmup: int, quiet: float, budget: float
) -> dict:
    """Time and memory of one family's tiny model."""
    family = FAMILIES[model_type]
    task = "classification" if family.kind == "encoder" else "causal-lm"
    path = resolve_model(ModelConfig(name=f"tiny-{model_type}")).path
    labels = list(INTENTS) if task == "classification" else []
    dp, plain, loaded = build_sides(path, task, labels, batch)
    batches = fixed_batches(loaded, task, batch, 4)
    t = measure(dp, plain, batches, warmup, steps, quiet, budget)
    memory = {}
    for side in (dp, plain):
        memory[side.name] = resident_bytes(side) + step_peak_bytes(side, batches[0])
    config = json.loads((path / "config.json").read_text())
    n_params = sum(p.numel() for p in loaded.model.base_model.model.parameters())
    arch = architecture_from_config(config, n_params)
    seq = int(batches[0]["input_ids"].shape[1])
    causal = task == "causal-lm"
    est = {
        dp_on: estimate_site_memory(arch, batch, seq, 8, 4, dp=dp_on, causal_lm=causal).total
        for dp_on in (True, False)
    }
    return {
        "family": model_type,
        "task": task,
        "params": n_params,
        "trainable": sum(p.numel() for p in loaded.model.parameters() if p.requires_grad),
        "seq_len": seq,
        "dp_ms": t.dp_ms,
        "nodp_ms": t.plain_ms,
        "dp_median_ms": median(t.dp_ms),
        "nodp_median_ms": median(t.plain_ms),
        "ratio": median(t.dp_ms) / median(t.plain_ms),
        "pair_ratio_median": median([a / b for a, b in zip(t.dp_ms, t.plain_ms, strict=True)]),
        "pairs_discarded": t.discarded,
        "dp_peak_mb": memory["DP-SGD"] / MB,
        "nodp_peak_mb": memory["non-DP"] / MB,
        "dp_estimate_mb": est[True] / MB,
        "nodp_estimate_mb": est[False] / MB,
    }


def format_table(results: list[dict]) -> str:
    """The Markdown table of the results."""
    headers = [
        "family",
        "task",
        "params",
        "LoRA+head params",
        "DP ms/step",
        "non-DP ms/step",
        "DP range",
        "ratio of medians",
        "median pair ratio",
        "peak MB DP",
        "peak MB non-DP",
        "estimate MB DP",
        "dropped pairs",
    ]
    rows = [
        [
            r["family"],
            r["task"],
            r["params"],
            r["trainable"],
            r["dp_median_ms"],
            r["nodp_median_ms"],
            spread(r["dp_ms"]),
            r["ratio"],
            r["pair_ratio_median"],
            r["dp_peak_mb"],
            r["nodp_peak_mb"],
            r["dp_estimate_mb"],
            r["pairs_discarded"],
        ]
        for r in results
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.families``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed pairs per family")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--batch", type=int, default=32, help="rows per batch (fixed, not sampled)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--max-wait", type=float, default=120, help="seconds to wait for quiet")
    ap.add_argument("--quiet", type=float, default=0.25, help="most foreign cores in a pair")
    ap.add_argument("--budget", type=float, default=60, help="seconds per family for quiet pairs")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument(
        "--memory-table", action="store_true", help="print the docs' site-memory tables and exit"
    )
    ap.add_argument(
        "--family-table", action="store_true", help="print the docs' family table and exit"
    )
    args = ap.parse_args(argv)
    if args.memory_table:
        print(markdown_tables())
        return 0
    if args.family_table:
        print(table(FAMILY_HEADERS, family_rows()))
        return 0
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    wait_for_quiet(args.max_wait, threshold=args.quiet)
    results = [
        run_family(f, args.batch, args.steps, args.warmup, args.quiet, args.budget)
        for f in args.families
    ]
    print(
        f"DP-SGD vs non-DP per family: tiny models (2 layers, hidden 64), LoRA r=8 on the "
        f"family targets, batch {args.batch}, max_length {MAX_LENGTH}, AdamW, fp32, "
        f"{torch.get_num_threads()} torch threads, {args.steps} timed pairs after "
        f"{args.warmup} warm-up"
    )
    print(format_table(results))
    if args.json:
        write_json(args.json, {"benchmark": "families", "machine": machine(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
