"""A watchdog that ends the processes a run started when the run itself is killed.

``fedslm simulate`` starts Ray (GCS, raylet, dashboard and runtime-env agents, one worker per
site). Ray ties its head processes to the run with ``PR_SET_PDEATHSIG``, but the agents the
raylet starts outlive a run killed with SIGKILL, which no handler in the run can catch.
``start_reaper`` starts a small process outside the run's process group (a Ctrl-C to the
terminal does not reach it) that notes every descendant of the run while it lives and, once
the run is gone, kills those still alive. A process is identified by its id and start time,
so a reused process id is never killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

# How often the run's process tree is looked at. A descendant started and orphaned between
# two looks would be missed; Ray's agents live as long as the run, so they are seen.
POLL_S = 0.5


def start_reaper(run_pid: int | None = None) -> subprocess.Popen[bytes]:
    """Start the watchdog of process ``run_pid`` (default: this process). Stop it with
    ``stop_reaper`` when the run ended normally (it then kills what the run left behind)."""
    pid = os.getpid() if run_pid is None else run_pid
    return subprocess.Popen(
        [sys.executable, "-m", "fedslm.reaper", str(pid)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # not in the run's process group: signals to it spare this
        close_fds=True,
    )


def stop_reaper(reaper: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Tell the watchdog the run is over (SIGTERM) and wait for it: it kills the processes
    the run started that are no longer its descendants (orphans it left behind), and leaves
    the run's own children alone."""
    if reaper.poll() is None:
        reaper.send_signal(signal.SIGTERM)
        try:
            reaper.wait(timeout)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait()


def _identity(proc: object) -> tuple[int, float]:
    return proc.pid, proc.create_time()  # type: ignore[attr-defined]


def watch(run_pid: int) -> int:
    """Note the descendants of ``run_pid`` until it exits, then kill those still running;
    on SIGTERM (the run ended normally) kill only those the run no longer parents. Returns
    the number of processes killed."""
    import psutil

    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: set[tuple[int, float]] = set()
    try:
        run = psutil.Process(run_pid)
        started = run.create_time()
    except psutil.Error:
        return 0
    while not stop:
        try:
            if not run.is_running() or run.create_time() != started:
                break
            if run.status() == psutil.STATUS_ZOMBIE:
                break
            for child in run.children(recursive=True):
                try:
                    if child.pid != os.getpid():
                        seen.add(_identity(child))
                except psutil.Error:
                    continue
        except psutil.Error:
            break
        time.sleep(POLL_S)
    if stop:  # the run is alive: what it still parents is its own business
        try:
            alive = {_identity(c) for c in run.children(recursive=True)}
        except psutil.Error:
            alive = set()
        seen -= alive
    return _kill(seen)


def _kill(seen: set[tuple[int, float]]) -> int:
    """SIGKILL every process of ``seen`` still running as itself, and its descendants."""
    import psutil

    victims: dict[int, psutil.Process] = {}
    for pid, created in seen:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != created:
                continue  # the id now belongs to another process
            victims[pid] = proc
            for child in proc.children(recursive=True):
                victims[child.pid] = child
        except psutil.Error:
            continue
    for proc in victims.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(victims.values()), timeout=3)
    return len(victims)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
