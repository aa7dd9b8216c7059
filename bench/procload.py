"""How much CPU *other* people's processes used while a benchmark ran (Linux ``/proc``).

The benchmark machine is shared. A process outside this benchmark's process tree (this
process, its subprocesses, and theirs: Ray's workers included) that takes even one core makes
a two-thread torch step several times slower, so each timed interval is tagged with the cores
foreign processes used during it, and disturbed intervals can be dropped.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from pathlib import Path


def _snapshot() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) for every readable process."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        # the command name is in parentheses and may hold spaces: split after the last ')'
        fields = text[text.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / hz)
    return out


def _ours(snap: dict[int, tuple[int, float]], root: int) -> set[int]:
    """``root`` and all its descendants in ``snap``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in snap.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


class ForeignLoad(threading.Thread):
    """Samples foreign CPU use every ``interval`` seconds until ``stop``; query with ``cores``."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.times: list[float] = []  # time.monotonic() of each sample
        self.total: list[float] = []  # cumulative foreign CPU seconds at each sample
        self._stop_event = threading.Event()
        self.available = Path("/proc/self/stat").exists()

    def run(self) -> None:
        """Sample until stopped (a process new since the last sample counts in full)."""
        if not self.available:
            return
        me = os.getpid()
        last: dict[int, float] = {}
        total = 0.0
        while True:
            snap = _snapshot()
            ours = _ours(snap, me)
            for pid, (_, cpu) in snap.items():
                if pid not in ours:
                    total += max(0.0, cpu - last.get(pid, cpu if not self.times else 0.0))
            last = {pid: cpu for pid, (_, cpu) in snap.items()}
            self.times.append(time.monotonic())
            self.total.append(total)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        """End sampling (waits for the thread)."""
        self._stop_event.set()
        self.join()

    def cores(self, start: float, end: float) -> float | None:
        """Mean cores used by foreign processes between two ``time.monotonic()`` readings."""
        if not self.available or len(self.times) < 2 or end <= start:
            return None
        # widen to the enclosing samples: a burst at an edge is not missed
        i = max(0, bisect.bisect_right(self.times, start) - 1)
        j = min(len(self.times) - 1, bisect.bisect_left(self.times, end))
        if j <= i:
            return None
        return (self.total[j] - self.total[i]) / (self.times[j] - self.times[i])
