"""Secure aggregation's extra work per round against plain FedAvg: 5 sites, a ~1M-parameter
adapter (goal from issue 6: below 1 s per round in simulation).

Two parts, in one invocation:

1. The protocol alone, in this process. The adapter is ``aggregation_throughput``'s LoRA layout
   (993,290 parameters). Each repeat runs, back to back, one plain ``fedavg`` of the five states
   and one secure session (``fedslm.secagg.run_session_in_process``) per scenario: no drop-out,
   one site dropping after sharing keys (round 1: the coordinator rebuilds its mask key and
   strips four pairwise masks), one dropping after its masked input (round 2). Times are medians
   over repeats (and over sites for per-site steps). "Sites in parallel" is the critical path of a
   deployment (the slowest site of each round, plus the coordinator); "one process" is every
   call in sequence. Components are timed separately to split a site's round 2 into key
   agreement and masking.
2. The same simulated job twice, plain and then secure (``fedslm simulate`` in a subprocess,
   Flower's simulation engine, 5 sites): tiny-bert with LoRA r=520 on query, key, value and
   every dense layer, 999,050 adapter parameters (the base model is tiny so that local training
   is a small part of a round and the difference stands out; the protocol's cost depends on the
   adapter's size only). Per round, ``wall_seconds`` of ``metrics.jsonl`` (from sending the
   global adapter until the round's checkpoint is written: training, the three extra QUERY
   exchanges, unmasking, evaluation). Round 1 pays Ray start-up and model loading, so the
   comparison is the median over rounds >= 2 (of ``--sim-pairs`` plain/secure runs, which
   alternate so that a busy spell on the shared machine hits both); each round is tagged with
   the cores processes outside this benchmark used meanwhile, and the medians are given over
   all those rounds and over the quiet ones. The secure runs' ``secure_aggregation.seconds``
   split the protocol into its three exchanges.

    python -m bench.secagg_overhead [--repeats 5] [--threads 1] [--max-wait 60] [--json FILE]
        [--sim-rounds 6] [--sim-local-steps 2] [--sim-rows 100] [--sim-pairs 2] [--quiet 0.25]
        [--out runs/bench-secagg]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench.aggregation_throughput import layout
from bench.common import OtherLoad, machine, median, spread, table, wait_for_quiet, write_json
from bench.framework_overhead import run_simulated
from bench.procload import ForeignLoad
from fedslm.aggregation import fedavg
from fedslm.artifacts import read_jsonl
from fedslm.secagg import SecAggParams, encode, run_session_in_process, shamir
from fedslm.secagg import crypto as sc

SITES = 5
RECORDS = [1200, 800, 1500, 950, 1100]  # weights: each site's training records
SCENARIOS = {"no drop-out": ({}, {}), "1 drops after r1": ({5}, {}), "1 drops after r2": ({}, {5})}
STEPS = [
    ("site", "advertise", "r0 advertise keys (2 X25519 key pairs)"),
    ("site", "share_keys", "r1 share keys (Shamir, 4x X25519+HKDF, AEAD)"),
    ("site", "masked_input", "r2 masked input (decrypt, key agreement, quantise, masks)"),
    ("site", "unmask", "r3 send unmasking shares"),
    ("coordinator", "collect_keys", "r0 collect keys"),
    ("coordinator", "relay_shares", "r1 relay ciphertexts"),
    ("coordinator", "collect_masked", "r2 sum masked inputs"),
    ("coordinator", "unmask", "r3 unmask (Shamir, strip masks, decode)"),
]


def states() -> list[dict[str, torch.Tensor]]:
    """Five site updates of the benchmark layout (deltas of LoRA scale, all within clip)."""
    out = []
    for seed in range(SITES):
        g = torch.Generator().manual_seed(seed)
        out.append({k: torch.randn(s, generator=g) * 0.02 for k, s in layout().items()})
    return out


def flatten(state: dict[str, torch.Tensor]) -> np.ndarray:
    """A state dict as one float32 vector (the order of the dict, which every site shares)."""
    return torch.cat([t.reshape(-1) for t in state.values()]).numpy()


def unflatten(vector: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``flatten`` for a float64 result, back to float32 tensors."""
    out, start = {}, 0
    for k, t in like.items():
        out[k] = torch.from_numpy(vector[start : start + t.numel()]).reshape(t.shape).float()
        start += t.numel()
    return out


def _time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def components(p: SecAggParams, flat: np.ndarray, like: dict[str, torch.Tensor]) -> list[list]:
    """Median seconds of the pieces a site's and the coordinator's rounds are made of."""
    sk, _ = sc.keypair()
    _, peer = sc.keypair()
    secret, holders = bytes(range(32)), list(range(1, SITES + 1))
    shares = shamir.split(secret, p.t, holders)
    size = flat.size + 1
    rows = [
        ("flatten state dict (site)", lambda: flatten(like)),
        ("quantise + weight, 1M (site)", lambda: encode(flat, RECORDS[0], p)),
        ("one PRG mask, ChaCha20, 1M x 8 B", lambda: sc.prg(bytes(32), size, p.dtype)),
        ("one X25519 + HKDF key agreement", lambda: sc.agree(sk, peer, p.session, b"x")),
        (
            "Shamir split, 2 secrets, 5 holders",
            lambda: [shamir.split(secret, p.t, holders) for _ in range(2)],
        ),
        ("AEAD encrypt one share pair", lambda: sc.encrypt(bytes(32), bytes(96), b"aad")),
        ("Shamir combine one secret", lambda: shamir.combine(shares, p.t)),
        ("unflatten result (coordinator)", lambda: unflatten(flat.astype(np.float64), like)),
    ]
    return [[name, 1e3 * _time(fn, 7)] for name, fn in rows]


def run(repeats: int, threads: int, max_wait: float) -> dict[str, Any]:
    """Measure, print the tables, return the raw results."""
    torch.set_num_threads(threads)  # numpy's element-wise ops and OpenSSL use one thread anyway
    site_states = states()
    flats = [flatten(s) for s in site_states]
    p = SecAggParams(session=b"bench", n_sites=SITES, clip_range=1.0)
    plain: list[float] = []
    runs: dict[str, list[dict[str, list[float]]]] = {name: [] for name in SCENARIOS}
    errors: dict[str, float] = {}
    run_session_in_process(p, [f[:1000] for f in flats], RECORDS)  # warm-up: imports, OpenSSL init
    load_seen = wait_for_quiet(max_wait)
    with OtherLoad() as load:
        for _ in range(repeats):
            start = time.perf_counter()
            reference = fedavg(zip(site_states, map(float, RECORDS), strict=True))
            plain.append(time.perf_counter() - start)
            expected = flatten(reference).astype(np.float64)
            for name, (out_r1, out_r2) in SCENARIOS.items():
                session = run_session_in_process(
                    p, flats, RECORDS, drop_after_round1=out_r1, drop_after_round2=out_r2
                )
                runs[name].append(dict(session.seconds))
                if not out_r1:  # all inputs in the sum: compare with plain FedAvg
                    errors[name] = float(np.abs(session.result.mean() - expected).max())
        comps = components(p, flats[0], site_states[0])
    params = sum(t.numel() for t in site_states[0].values())
    print(
        f"Secure aggregation vs FedAvg: {SITES} sites, {params:,} parameters, ring 2^"
        f"{p.ring_bits}, {p.bits}-bit grid on [-{p.clip_range}, {p.clip_range}], threshold "
        f"{p.t}; torch threads {threads}, median of {repeats}; seconds"
    )
    print(format_steps(runs, plain))
    print()
    print(format_bytes(params, p))
    print()
    print(table(["component", "ms"], comps))
    print(
        f"\nmax |secure mean - fedavg| = {max(errors.values()):.2e} (bound: step/2 = "
        f"{p.step / 2:.2e}, plus fedavg's float32 rounding); other processes used "
        f"{'n/a' if load.cores is None else f'{load.cores:.2f}'} cores during the runs"
        f" ({'n/a' if load_seen is None else f'{load_seen:.2f}'} just before)"
    )
    return {
        "benchmark": "secagg_overhead",
        "machine": machine(),
        "torch_threads": threads,
        "repeats": repeats,
        "params": params,
        "ring_bits": p.ring_bits,
        "bits": p.bits,
        "threshold": p.t,
        "plain_fedavg_seconds": plain,
        "sessions": runs,
        "components_ms": comps,
        "max_abs_error_vs_fedavg": errors,
        "other_load_cores": load.cores,
    }


def format_steps(runs: dict[str, list[dict[str, list[float]]]], plain: list[float]) -> str:
    """Per-round step times per scenario, the two totals and plain FedAvg."""
    names = list(runs)
    rows: list[list[Any]] = []
    for who, step, label in STEPS:
        key = f"{who}.{step}"
        cells = [median([x for r in runs[n] for x in r.get(key, [0.0])]) for n in names]
        rows.append([who, label, *cells])

    def per_run(n: str, fn: Callable[[dict[str, list[float]]], float]) -> float:
        return median([fn(r) for r in runs[n]])

    def critical(r: dict[str, list[float]]) -> float:
        return sum(max(v) for v in r.values())

    # a site that takes part in every round costs the sum of its step medians
    site_total = [sum(r[2 + i] for r in rows if r[0] == "site") for i in range(len(names))]
    rows.append(["site", "all rounds, one site", *site_total])
    rows.append(["both", "per round, sites in parallel", *[per_run(n, critical) for n in names]])
    seq = [per_run(n, lambda r: sum(sum(v) for v in r.values())) for n in names]
    rows.append(["both", "per round, one process (all sites in sequence)", *seq])
    rows.append(["coordinator", f"plain fedavg, {SITES} states ({spread(plain)})", median(plain)])
    rows[-1] += [median(plain)] * (len(names) - 1)
    return table(["who", "step", *names], rows)


def format_bytes(params: int, p: SecAggParams) -> str:
    """What one site uploads per round, plain and secure."""
    shares = (SITES - 1) * (sc.NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16)
    unmask = SITES * shamir.SHARE_BYTES
    secure = 2 * sc.KEY_BYTES + shares + (params + 1) * p.dtype.itemsize + unmask
    rows = [
        ["plain: float32 adapter", params * 4],
        ["secure: keys + encrypted shares + masked vector + unmasking shares", secure],
    ]
    return table(["upload per site per round", "bytes"], rows)


# -- part 2: the same job simulated plain and secure ----------------------------------------

SIM_LORA = {"r": 520, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]}
SIM_MODES = ("plain", "secure")


def write_sim_configs(out: Path, rounds: int, local_steps: int, rows: int) -> dict[str, Path]:
    """The job of part 2, as ``out/plain.yaml`` and ``out/secure.yaml`` (they differ only in
    ``federation.secure_aggregation``). DP is on with a fixed noise multiplier: calibrating it
    takes seconds per site and is not what is measured."""
    raw: dict[str, Any] = {
        "seed": 3,
        "model": {"name": "tiny-bert"},
        "task": {"type": "classification"},
        "lora": SIM_LORA,
        "train": {
            "local_steps": local_steps,
            "batch_size": 16,
            "learning_rate": 0.01,
            "max_length": 32,
        },
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5},
        "federation": {"sites": SITES, "rounds": rounds, "aggregation": "fedavg-factors"},
        "data": {"synthetic": {"rows_per_site": rows, "skew": 1.0}},
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in SIM_MODES:
        raw["federation"]["secure_aggregation"] = mode == "secure"
        paths[mode] = out / f"{mode}.yaml"
        paths[mode].write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def simulate(
    rounds: int,
    local_steps: int,
    rows: int,
    pairs: int,
    out: Path,
    max_wait: float,
    quiet: float,
) -> dict[str, Any]:
    """Run the job plain, then secure, ``pairs`` times; return every run's rounds and the
    summary: rounds >= 2 of all runs of a mode pooled, all of them and the quiet ones (other
    processes used at most ``quiet`` cores), and the secure runs' protocol time per exchange
    (``secure_aggregation.seconds`` of ``metrics.jsonl``)."""
    from safetensors import safe_open

    configs = write_sim_configs(out, rounds, local_steps, rows)
    monitor = ForeignLoad()
    monitor.start()
    runs: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in SIM_MODES}
    stages: list[dict[str, float]] = []  # secure rounds >= 2
    try:
        for i in range(pairs):
            for mode in SIM_MODES:
                wait_for_quiet(max_wait)
                print(f"[{i + 1}/{pairs}] simulated run, {mode} ...", file=sys.stderr, flush=True)
                run_dir = out / f"{mode}-{i + 1}"
                shutil.rmtree(run_dir, ignore_errors=True)
                runs[mode].append(run_simulated(configs[mode], run_dir, monitor))
                if mode == "secure":
                    lines = read_jsonl(run_dir / "metrics.jsonl")[1:]
                    stages += [rec["secure_aggregation"]["seconds"] for rec in lines]
    finally:
        monitor.stop()
    weights = out / "secure-1" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), framework="numpy") as fh:
        params = sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())  # noqa: SIM118
    summary: dict[str, Any] = {
        "params": params,
        "sites": SITES,
        "rounds": rounds,
        "local_steps": local_steps,
        "rows_per_site": rows,
        "pairs": pairs,
        "lora": SIM_LORA,
        "quiet_threshold_cores": quiet,
    }
    for m in SIM_MODES:
        later = [r for run in runs[m] for r in run[1:]]
        seconds = [r["seconds"] for r in later]
        calm = [
            r["seconds"]
            for r in later
            if r["foreign_cores"] is not None and r["foreign_cores"] <= quiet
        ]
        summary[m] = {
            "round1_s": median([run[0]["seconds"] for run in runs[m]]),
            "later_median_s": median(seconds) if seconds else None,
            "later_spread": spread(seconds) if seconds else None,
            "later_rounds": len(seconds),
            "quiet_median_s": median(calm) if calm else None,
            "quiet_rounds": len(calm),
            "later_foreign_cores": [r["foreign_cores"] for r in later],
        }
    for key in ("later", "quiet"):
        a, b = summary["secure"][f"{key}_median_s"], summary["plain"][f"{key}_median_s"]
        summary[f"{key}_difference_s"] = a - b if a is not None and b is not None else None
        summary[f"{key}_ratio"] = a / b if a and b else None
    summary["secure_stage_median_s"] = {
        k: median([st[k] for st in stages if k in st])
        for k in ("share-keys", "masked-input", "unmask", "protocol")
        if any(k in st for st in stages)
    }
    return {"runs": runs, "summary": summary}


def format_simulation(result: dict[str, Any]) -> str:
    """The table of part 2 and one line of round times per run."""
    s = result["summary"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    def load(m: str) -> str:
        cores = [c for c in s[m]["later_foreign_cores"] if c is not None]
        return "n/a" if not cores else f"{median(cores):.2f}"

    rows = [
        [m, fmt(s[m]["round1_s"]), fmt(s[m]["later_median_s"]), s[m]["later_spread"] or "n/a",
         s[m]["later_rounds"], load(m), fmt(s[m]["quiet_median_s"]), s[m]["quiet_rounds"]]
        for m in SIM_MODES
    ]  # fmt: skip
    rows.append(["secure - plain", "", fmt(s["later_difference_s"]), "", "", "",
                 fmt(s["quiet_difference_s"]), ""])  # fmt: skip
    rows.append(["secure / plain", "", fmt(s["later_ratio"]), "", "", "",
                 fmt(s["quiet_ratio"]), ""])  # fmt: skip
    headers = [
        "run", "round 1", "rounds >= 2: median", "min-max", "rounds", "foreign cores (median)",
        f"quiet rounds (<= {s['quiet_threshold_cores']} foreign cores): median", "rounds",
    ]  # fmt: skip
    stage_rows = [[k, fmt(v)] for k, v in s["secure_stage_median_s"].items()]
    lines = [
        f"Simulated round, plain vs secure: {s['sites']} sites, tiny-bert + LoRA r="
        f"{s['lora']['r']} on {', '.join(s['lora']['target_modules'])} ({s['params']:,} adapter "
        f"parameters), {s['local_steps']} local steps, {s['rows_per_site']} rows per site, "
        f"{s['rounds']} rounds, {s['pairs']} plain/secure pair(s); seconds (goal: secure - plain "
        "below 1 s)",
        table(headers, rows),
        "",
        "Secure runs, rounds >= 2, median seconds of each exchange after training and of the "
        "whole protocol (exchanges plus the coordinator's summing and unmasking):",
        table(["stage", "seconds"], stage_rows),
    ]
    for m in SIM_MODES:
        for run in result["runs"][m]:
            parts = [
                f"{r['seconds']:.2f}"
                + ("" if r["foreign_cores"] is None else f" ({r['foreign_cores']:.2f})")
                for r in run
            ]
            lines.append(f"  {m}: round seconds (foreign cores): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.secagg_overhead``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="sessions per scenario")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument(
        "--max-wait", type=float, default=60, help="seconds to wait for a quiet machine"
    )
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument(
        "--sim-rounds", type=int, default=6, help="rounds of each simulated run (0: skip part 2)"
    )
    ap.add_argument("--sim-local-steps", type=int, default=2, help="local steps per round")
    ap.add_argument("--sim-rows", type=int, default=100, help="synthetic rows per site")
    ap.add_argument("--sim-pairs", type=int, default=2, help="plain/secure runs, alternating")
    ap.add_argument(
        "--quiet", type=float, default=0.25, help="most foreign cores for a 'quiet' round"
    )
    ap.add_argument(
        "--out", type=Path, default=Path("runs/bench-secagg"), help="work folder of part 2"
    )
    args = ap.parse_args(argv)
    result = run(args.repeats, args.threads, args.max_wait)
    if args.sim_rounds > 0:
        sim = simulate(
            args.sim_rounds,
            args.sim_local_steps,
            args.sim_rows,
            args.sim_pairs,
            args.out.resolve(),
            args.max_wait,
            args.quiet,
        )
        print()
        print(format_simulation(sim))
        result["simulation"] = sim
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
