"""A whole deployment on this machine's loopback, driven by the operators' own commands.

Certificates (``fedslm certs``), a coordinator with TLS, SuperNode authentication and the
proxy (``fedslm coordinator start``), site folders made as a site operator makes them
(``fedslm site keygen``, ``fedslm synth`` for data, a policy file with a ``daemon:`` section),
registration (``fedslm coordinator add-site``) and site daemons (``fedslm site start``), each a
separate process. Used by the end-to-end test and the deployment overhead benchmark, and handy
for trying the deployment path on one machine. Every process started is tracked (with its
children) and ``stop_all`` stops them by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fedslm.data.synthetic import INTENTS

FEDSLM = str(Path(sys.executable).parent / "fedslm")
T = TypeVar("T")


class LoopbackError(RuntimeError):
    """A step of the loopback deployment failed or timed out; the message says which."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``fedslm ARGS`` as an operator would; raise with its output if it fails."""
    proc = subprocess.run(
        [FEDSLM, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LoopbackError(f"fedslm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(what: str, cond: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """Poll ``cond`` until it returns something true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise LoopbackError(f"timed out after {timeout:.0f} s waiting for {what}")


class LoopbackDeployment:
    """The folders and processes of one deployment under ``root``."""

    def __init__(
        self,
        root: Path,
        sites: tuple[str, ...] = ("site-a", "site-b", "site-c"),
        spare_sites: tuple[str, ...] = (),
        rows_per_site: int = 120,
        nginx: str | None = "/usr/sbin/nginx",
        poll_interval_s: float | None = None,
    ) -> None:
        import psutil

        self.psutil = psutil
        self.root = root
        self.sites = sites
        self.spare_sites = spare_sites  # made like the others but never registered
        self.rows_per_site = rows_per_site
        self.nginx = nginx
        self.poll_interval_s = poll_interval_s  # the sites' daemon.poll_interval_s (None: default)
        self.procs: dict[str, subprocess.Popen] = {}
        # psutil handles, not bare PIDs: they refuse to signal a recycled PID
        self.seen: dict[int, Any] = {}
        self.config = root / "coordinator" / "coordinator.yaml"
        self.proxy_port = free_port()

    # -- set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Certificates, the coordinator's service file, and every site's folder."""
        coord = self.root / "coordinator"
        coord.mkdir(parents=True)
        cli("certs", str(coord / "certs"), "--host", "127.0.0.1", "--host", "localhost")
        settings = {
            "state_dir": "state",
            "tls": {
                "ca_cert": "certs/ca.crt",
                "cert": "certs/server.pem",
                "key": "certs/server.key",
            },
            "superlink": {"host": "127.0.0.1", "port": free_port()},
            "proxy": {"enabled": self.nginx is not None, "host": "127.0.0.1",
                      "port": self.proxy_port, "nginx": self.nginx or "nginx"},
        }  # fmt: skip
        self.config.write_text(yaml.safe_dump(settings))
        for i, name in enumerate((*self.sites, *self.spare_sites)):
            self._make_site(name, seed=i)

    @property
    def site_api_port(self) -> int:
        """The port sites dial: the proxy's, or the SuperLink's when there is no proxy."""
        if self.nginx is not None:
            return self.proxy_port
        return int(yaml.safe_load(self.config.read_text())["superlink"]["port"])

    def start(self) -> None:
        """Set up, start the coordinator, register the sites and start their daemons."""
        self.setup()
        self.start_coordinator()
        self.register_sites()
        for name in self.sites:
            self.start_site(name)

    def register_sites(self) -> None:
        """``fedslm coordinator add-site`` for every site but the spare ones."""
        for name in self.sites:
            cli("coordinator", "add-site", name, str(self.site_dir(name) / "site.pub"),
                 "--config", str(self.config))  # fmt: skip

    def site_dir(self, name: str) -> Path:
        """A site's own folder: key pair, data, CA certificate, policy, ledger, state."""
        return self.root / name

    def _make_site(self, name: str, seed: int) -> None:
        folder = self.site_dir(name)
        folder.mkdir()
        cli("site", "keygen", str(folder))
        cli("synth", str(folder / "data.csv"), "--sites", "1",
            "--rows-per-site", str(self.rows_per_site),
             "--seed", str(seed))  # fmt: skip
        shutil.copy(self.root / "coordinator" / "certs" / "ca.crt", folder / "ca.crt")
        policy: dict[str, Any] = {
            "data": "data.csv",
            "ledger": "ledger.db",
            "privacy": {"lifetime_epsilon": 100.0, "max_epsilon_per_job": 10.0},
            "daemon": {
                "name": name,
                "coordinator": f"127.0.0.1:{self.site_api_port}",
                "ca_cert": "ca.crt",
                "key": "site.key",
                "state_dir": "state",
                "runtime_port": free_port(),
            },
        }
        if self.poll_interval_s is not None:
            policy["daemon"]["poll_interval_s"] = self.poll_interval_s
        (folder / "site.yaml").write_text(yaml.safe_dump(policy))

    def write_job(self, name: str, job: dict[str, Any] | None = None, **federation: object) -> Path:
        """A small DP job on every registered site (``job`` and ``federation`` override)."""
        job = job or {
            "seed": 7,
            "model": {"name": "tiny-bert"},
            "lora": {"r": 4, "alpha": 8},
            "train": {"local_steps": 3, "batch_size": 16, "max_length": 24,
                      "learning_rate": 0.05},
            "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5},
            "data": {"at_sites": True, "labels": list(INTENTS)},
            "federation": {"sites": list(self.sites), "rounds": 2, "min_sites": 2,
                           "round_timeout_s": 40, "connect_timeout_s": 90},
        }  # fmt: skip
        job.setdefault("federation", {}).update(federation)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    # -- processes -----------------------------------------------------------------------------

    def _spawn(
        self, key: str, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                [FEDSLM, *args], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.procs[key] = proc
        self._note(proc.pid)
        return proc

    def _note(self, pid: int) -> None:
        for p in self._tree(pid):
            self.seen.setdefault(p.pid, p)

    def start_coordinator(self) -> None:
        """``fedslm coordinator start``; returns once it says it is up."""
        log = self.root / "coordinator" / "start.log"
        self._spawn("coordinator", ["coordinator", "start", "--config", str(self.config)], log)
        wait_for("the coordinator", lambda: "coordinator up" in log.read_text(), 90)

    def start_site(self, name: str) -> subprocess.Popen:
        """``fedslm site start`` for ``name`` (its output in SITE/daemon.out)."""
        log = self.site_dir(name) / "daemon.out"
        # sites sharing this machine share its cores, as simulated sites do (one each): a
        # site on its own machine would use all of them
        threads = str(max(1, (os.cpu_count() or 1) // len(self.sites)))
        return self._spawn(
            name,
            ["site", "start", "--policy", str(self.site_dir(name) / "site.yaml")],
            log,
            {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        )

    def kill(self, key: str) -> None:
        """SIGKILL a process and everything under it: a crash, not a shutdown."""
        proc = self.procs.pop(key)
        tree = self._tree(proc.pid)
        for p in tree:
            self.seen.setdefault(p.pid, p)
            with contextlib.suppress(self.psutil.NoSuchProcess):
                p.kill()
        self.psutil.wait_procs(tree, timeout=15)
        proc.wait(5)

    def _tree(self, pid: int) -> list[Any]:
        try:
            root = self.psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except self.psutil.NoSuchProcess:
            return []

    def stop_all(self) -> list[int]:
        """Stop every process (gently, then by force); return the PIDs still alive after."""
        for proc in self.procs.values():
            self._note(proc.pid)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for p in self.seen.values():  # children and orphans of killed processes included
            with contextlib.suppress(self.psutil.NoSuchProcess):
                p.kill()
        self.psutil.wait_procs(list(self.seen.values()), timeout=10)
        return [p.pid for p in self.seen.values() if self._alive(p)]

    # -- runs -----------------------------------------------------------------------------------

    def _alive(self, p: Any) -> bool:
        try:
            return bool(p.is_running() and p.status() != self.psutil.STATUS_ZOMBIE)
        except self.psutil.NoSuchProcess:
            return False

    def run(self, job: Path, name: str) -> Path:
        """``fedslm coordinator run JOB --name NAME``; returns the run folder."""
        cli("coordinator", "run", str(job), "--name", name, "--config", str(self.config))
        return self.root / "coordinator" / "state" / "runs" / name

    def run_dir(self, name: str) -> Path:
        """Run ``name``'s folder on the coordinator."""
        return self.root / "coordinator" / "state" / "runs" / name

    def wait_finished(self, name: str, timeout: float) -> dict:
        """Wait for run ``name`` to end; raise unless it finished (printing its log)."""

        def done() -> dict | None:
            path = self.run_dir(name) / "status.json"
            if not path.exists():
                return None
            st = json.loads(path.read_text())
            return st if st["state"] in ("finished", "failed") else None

        try:
            status = wait_for(f"run {name} to end", done, timeout, every=1.0)
        except LoopbackError:
            print(cli("coordinator", "logs", name, "--config", str(self.config),
                       check=False).stdout[-4000:])  # fmt: skip
            raise
        if status["state"] != "finished":
            raise LoopbackError(f"run {name} {status['state']}: {status.get('reason')}")
        return status

    def rounds_done(self, name: str) -> list[dict]:
        """The lines of run ``name``'s metrics.jsonl so far."""
        path = self.run_dir(name) / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
