"""Helpers shared by the benchmarks: medians, tables, machine facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (robust to the noisy outliers of a shared machine)."""
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """``min–max`` of the values, formatted, so a table shows how noisy a median is."""
    return f"{min(values):.3g}–{max(values):.3g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal and pasteable into docs/benchmarks.md)."""
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average says how busy the box was."""
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, summed over cores."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """CPU used by *other* processes while a block runs, in cores (0 = the box was ours).

    Machine-wide busy time minus this process's own CPU time (and its waited-for children's).
    Only meaningful on Linux; elsewhere it reports None.
    """

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._busy: float | None
        try:
            self._busy = _busy_seconds()
        except (OSError, ValueError):
            self._busy = None
        self._own = _own_cpu()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._busy is None:
            return
        wall = time.perf_counter() - self._wall
        if wall <= 0:
            return
        others = (_busy_seconds() - self._busy) - (_own_cpu() - self._own)
        self.cores = max(0.0, others / wall)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_for_quiet(max_wait: float, threshold: float = 0.25, window: float = 5.0) -> float | None:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` cores.

    The machine is shared: a busy neighbour makes two torch threads on two cores several times
    slower (OpenMP threads wait on each other), so a benchmark started under load measures the
    neighbour. Returns the last load seen (cores), or None where it cannot be measured.
    """
    deadline = time.monotonic() + max_wait
    while True:
        with OtherLoad() as load:
            time.sleep(window)
        if load.cores is None or load.cores < threshold or time.monotonic() > deadline:
            return load.cores
        print(
            f"  waiting for a quiet machine: other processes use {load.cores:.2f} cores",
            file=sys.stderr,
        )


def own_ledgers_env() -> dict[str, str]:
    """The environment for one benchmark run of ``fedslm simulate``/``centralized``: its
    simulated sites get a fresh ledger folder (``FEDSLM_LEDGERS``). Benchmark runs are separate
    measurements on synthetic or public data; on one shared ledger they would compose, and the
    data set's budget would refuse the later ones."""
    return {**os.environ, "FEDSLM_LEDGERS": tempfile.mkdtemp(prefix="fedslm-bench-ledgers-")}
