"""Per-round overhead of the deployed site's path: a fresh thin ClientApp process -> the worker.

With Flower's default isolation, a SuperNode starts a fresh ClientApp process for every
message. Before the site worker, that process imported torch, loaded the model and prepared the
data each time; with the worker it imports Flower and ``fedslm.clients.app`` only and forwards
the message to the site's long-lived worker over a Unix socket. (Since then the site's
executor, ``fedslm.clients.executor``, runs the ClientApp in one long-lived process, so of (a)
below only the bridge round trip is paid per message; bench/deployment_overhead.py measures
the whole deployed round.) Goal: at most 3 s per round beyond local training.

Measured on the same training request (a tiny BERT, DP on, ``--steps`` local steps), each
repetition a new round:

- (a) deployment path: wall time of a fresh ``python -c`` process that imports
  ``fedslm.clients.app`` and does one bridge round trip (``call_worker``) to a live worker in
  this process (the worker trains the round, stores the release, replies). Inside it: the
  import time and the round trip, and, in the worker, the time ``Worker.handle`` took.
- (b) in process: the same request handled by ``fedslm.clients.handlers.handle_train`` on an
  already built ``Site`` (what the worker does, minus socket, serialisation and the release
  store).
- (c) before the worker: a fresh process that imports the site code, builds the ``Site``
  (model load, data split) and handles the request, as every deployed ClientApp process did.

Overhead per round = (a) - (b). Flower's own message delivery (SuperLink -> SuperNode ->
ClientApp process start by the SuperExec) is not included: it is the same on every path.

    python -m bench.worker_overhead [--repeats 5] [--steps 5] [--rows 400] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from fedslm.clients.bridge import encode_records
from fedslm.clients.handlers import handle_train
from fedslm.clients.worker import Worker, load_or_create_secret
from fedslm.wire.codec import state_to_arrays
from flwr.app import ConfigRecord, RecordDict

from bench.common import REPO, OtherLoad, machine, median, spread, table, wait_for_quiet, write_json
from fedslm import __version__
from fedslm.config import JobConfig, validate_config
from fedslm.data import INTENTS, generate_bank_messages, write_rows
from fedslm.models.registry import resolve_model
from fedslm.policy import SitePolicy, policy_from_mapping
from fedslm.site import Site

SITE = "site-1"

THIN = """
import json, sys, time
t0 = time.perf_counter()
import fedslm.clients.app  # what Flower's ClientApp process imports
from fedslm.clients.bridge import call_worker, decode_records
from flwr.app import RecordDict
t1 = time.perf_counter()
content = decode_records(open(sys.argv[1], "rb").read(), "content")
reply, state = call_worker(sys.argv[2], "train", content, RecordDict(), node_id=1, run_id=1)
t2 = time.perf_counter()
assert "arrays" in reply, reply
print(json.dumps({"import": t1 - t0, "round_trip": t2 - t1}))
"""

FAT = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from bench.worker_overhead import build_site, job, policy
from fedslm.clients.bridge import decode_records
from fedslm.clients.handlers import handle_train
from flwr.app import RecordDict
t1 = time.perf_counter()
folder = Path(sys.argv[2])
site = build_site(policy(folder, Path(sys.argv[3])), job(int(sys.argv[4])), sys.argv[5])
t2 = time.perf_counter()
content = decode_records(open(sys.argv[1], "rb").read(), "content")
reply = handle_train(site, content, RecordDict(), 1)
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "build": t2 - t1, "handle": t3 - t2}))
"""


def job(steps: int) -> JobConfig:
    """The deployed job every path runs: tiny BERT, DP on, ``steps`` local steps per round."""
    return validate_config(
        {
            "seed": 5,
            "model": {"name": "tiny-bert"},
            "lora": {"r": 4, "alpha": 8},
            "train": {"local_steps": steps, "batch_size": 32, "max_length": 32},
            "privacy": {"noise_multiplier": 1.0},
            "federation": {"sites": [SITE], "rounds": 100},
            "data": {"at_sites": True, "labels": list(INTENTS)},
        }
    )


def policy(folder: Path, data: Path) -> SitePolicy:
    """A site policy with its own ledger and state_dir under ``folder``."""
    return policy_from_mapping(
        {
            "data": str(data),
            "ledger": str(folder / "ledger.db"),
            "max_rounds": 1000,
            "privacy": {"lifetime_epsilon": 1e6, "max_epsilon_per_job": 1e6},
            "daemon": {
                "name": SITE,
                "coordinator": "127.0.0.1:9",
                "ca_cert": "unused",
                "key": "unused",
                "state_dir": str(folder / "state"),
            },
        },
        "bench policy",
    )


def build_site(p: SitePolicy, j: JobConfig, job_id: str) -> Site:
    """The site as the worker builds it for ``j``, in this process."""
    w = Worker(p)
    w.state_dir.mkdir(parents=True, exist_ok=True)
    w._secret = load_or_create_secret(w.state_dir / "site.secret")
    return w._build_site(j, job_id, resolve_model(j.model).sha256)


def request(
    j: JobConfig, round_num: int, job_id: str, adapter: dict[str, torch.Tensor]
) -> RecordDict:
    """A training message as the deployed coordinator sends it."""
    config = ConfigRecord(
        {
            "round": round_num,
            "quiet": True,
            "job": json.dumps(j.model_dump(mode="json")),
            "job-id": job_id,
            "model-sha256": resolve_model(j.model).sha256,
            "fedslm-version": __version__,
            "flwr-version": version("flwr"),
        }
    )
    return RecordDict({"arrays": state_to_arrays(adapter), "config": config})


def _python(code: str, *args: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, check=False
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure (a), (b), (c) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="quiet rounds to measure (a, b)")
    ap.add_argument("--max-repeats", type=int, default=15, help="rounds to try at most")
    ap.add_argument("--fat", type=int, default=2, help="repetitions of (c), the slow path")
    ap.add_argument(
        "--quiet", type=float, default=0.3, help="leave out rounds with more other load (cores)"
    )
    ap.add_argument("--steps", type=int, default=5, help="local DP steps per round")
    ap.add_argument("--rows", type=int, default=400, help="rows in the site's data file")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    ap.add_argument(
        "--max-wait", type=float, default=300, help="wait up to this long for a quiet machine"
    )
    args = ap.parse_args()
    before = wait_for_quiet(args.max_wait)

    # a short path: Unix socket paths are limited to 107 bytes
    root = Path(tempfile.mkdtemp(prefix="fslm-bench-", dir="/tmp"))
    data = root / "data.csv"
    rows = generate_bank_messages([SITE], args.rows, 0, 1.0)
    write_rows([{"text": r["text"], "label": r["label"]} for r in rows], data)
    j = job(args.steps)
    handled: list[float] = []
    worker = Worker(policy(root / "worker", data))
    inner = worker.handle

    def timed_handle(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            handled.append(time.perf_counter() - t)

    worker.handle = timed_handle  # type: ignore[method-assign]
    worker.start()
    local = build_site(policy(root / "local", data), j, "bench-local")
    adapter = local.initial_state()
    # round 1 loads the job through the worker (once per job, not per round) and, in process,
    # costs the job once against the policy: neither is timed
    _python(
        THIN,
        _write(root / "r1.pb", request(j, 1, "bench-worker", adapter)),
        str(worker.socket_path),
    )
    handle_train(local, request(j, 1, "bench-local", adapter), RecordDict(), 1)
    a_wall, a_import, a_trip, b_handle, kept_handled = [], [], [], [], []
    loads: list[tuple[float | None, float | None]] = []
    r = 1
    while len(a_wall) < args.repeats and r <= args.max_repeats:
        r += 1
        # (b) then (a) on the same round: the same work, side by side in time
        with OtherLoad() as lb:
            t = time.perf_counter()
            handle_train(local, request(j, r, "bench-local", adapter), RecordDict(), 1)
            b = time.perf_counter() - t
        handled.clear()
        msg = request(j, r, "bench-worker", adapter)
        with OtherLoad() as la:
            wall, inside = _python(THIN, _write(root / f"a{r}.pb", msg), str(worker.socket_path))
        loads.append((lb.cores, la.cores))
        if max(lb.cores or 0.0, la.cores or 0.0) > args.quiet:
            print(f"  round {r}: left out, other processes used {lb.cores}/{la.cores} cores")
            continue
        b_handle.append(b)
        a_wall.append(wall)
        a_import.append(inside["import"])
        a_trip.append(inside["round_trip"])
        kept_handled.extend(handled)
    worker.stop()
    handled = kept_handled
    c_wall, c_build = [], []
    for i in range(args.fat):  # slow: fewer repetitions
        fat = request(j, 1, f"bench-fat-{i}", adapter)
        wall, inside = _python(
            FAT, _write(root / f"c{i}.pb", fat), str(root / f"fat{i}"), str(data),
            str(args.steps), f"bench-fat-{i}",
        )  # fmt: skip
        c_wall.append(wall)
        c_build.append(inside["build"])

    overhead = [a - b for a, b in zip(a_wall, b_handle, strict=True)]
    figures = [
        ("(a) fresh thin ClientApp process + bridge round trip (wall)", a_wall),
        ("    of which: interpreter start + import fedslm.clients.app", a_import),
        ("    of which: bridge round trip (send, worker handles, reply)", a_trip),
        ("    of which: Worker.handle (training, ledger, egress, release store)", handled),
        ("(b) same request handled in process (handle_train on a built Site)", b_handle),
        ("(a) - (b): overhead per round of the deployment path", overhead),
        (
            "(c) before the worker: fresh process importing torch, building the Site, handling",
            c_wall,
        ),
        ("    of which: building the Site (model load, data split)", c_build),
    ]
    rows_out = [[name, median(v), spread(v)] for name, v in figures]
    print(table(["path", "median s", "range s"], rows_out))
    print(
        f"\n{len(a_wall)} rounds (a, b), {len(c_wall)} (c); tiny-bert, {args.steps} DP steps "
        f"of batch 32 per round, {len(rows)} rows; torch threads {torch.get_num_threads()}; "
        f"other processes used {_cores(before)} cores before the run; "
        f"{len(loads) - len(a_wall)} rounds left out (other load > {args.quiet} cores)"
    )
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine(),
                "args": vars(args) | {"json": str(args.json)},
                "a_wall": a_wall, "a_import": a_import, "a_round_trip": a_trip,
                "worker_handle": handled, "b_handle": b_handle, "overhead": overhead,
                "c_wall": c_wall, "c_build": c_build,
                "other_load_before": before, "other_load_b_a": loads,
            },
        )  # fmt: skip


def _cores(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def _write(path: Path, msg: RecordDict) -> str:
    path.write_bytes(encode_records(msg))
    return str(path)


if __name__ == "__main__":
    main()
