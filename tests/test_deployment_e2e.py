"""A real deployment on loopback: coordinator (SuperLink + TLS + SuperNode auth + proxy) and
three site daemons as separate processes, driven only by the commands an operator runs.

One module-scoped cluster serves every test (starting it costs most of the time): an
unregistered site is refused; a job runs to the end; the coordinator is killed mid-run and
resumed, ending with the same adapter as the uninterrupted run and no spend counted twice;
a site is killed mid-round, the run completes without it and it rejoins with the same key.
Every process started here is stopped by PID at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from fedslm.data.synthetic import INTENTS

FEDSLM = str(Path(sys.executable).parent / "fedslm")
NGINX = "/usr/sbin/nginx"
SITES = ("site-a", "site-b", "site-c")
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists(),
    reason="nginx is not installed (`make test` installs it as root with apt); the deployment "
    "test needs the site-facing proxy",
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [FEDSLM, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fedslm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _wait(what: str, cond: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    """The processes of one loopback deployment and the files they use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        # psutil handles, not bare PIDs: they refuse to signal a recycled PID
        self.seen: dict[int, psutil.Process] = {}
        self.config = root / "coordinator" / "coordinator.yaml"
        self.proxy_port = _free_port()

    # -- set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        coord = self.root / "coordinator"
        coord.mkdir(parents=True)
        _cli("certs", str(coord / "certs"), "--host", "127.0.0.1", "--host", "localhost")
        settings = {
            "state_dir": "state",
            "tls": {
                "ca_cert": "certs/ca.crt",
                "cert": "certs/server.pem",
                "key": "certs/server.key",
            },
            "superlink": {"host": "127.0.0.1", "port": _free_port()},
            "proxy": {"enabled": True, "host": "127.0.0.1", "port": self.proxy_port,
                      "nginx": NGINX},
        }  # fmt: skip
        self.config.write_text(yaml.safe_dump(settings))
        for i, name in enumerate((*SITES, "site-x")):
            self._make_site(name, seed=i)

    def register_sites(self) -> None:
        for name in SITES:  # site-x stays unregistered
            _cli("coordinator", "add-site", name, str(self.site_dir(name) / "site.pub"),
                 "--config", str(self.config))  # fmt: skip

    def site_dir(self, name: str) -> Path:
        return self.root / name

    def _make_site(self, name: str, seed: int) -> None:
        folder = self.site_dir(name)
        folder.mkdir()
        _cli("site", "keygen", str(folder))
        _cli("synth", str(folder / "data.csv"), "--sites", "1", "--rows-per-site", "120",
             "--seed", str(seed))  # fmt: skip
        shutil.copy(self.root / "coordinator" / "certs" / "ca.crt", folder / "ca.crt")
        policy = {
            "data": "data.csv",
            "ledger": "ledger.db",
            "privacy": {"lifetime_epsilon": 100.0, "max_epsilon_per_job": 10.0},
            "daemon": {
                "name": name,
                "coordinator": f"127.0.0.1:{self.proxy_port}",
                "ca_cert": "ca.crt",
                "key": "site.key",
                "state_dir": "state",
                "runtime_port": _free_port(),
            },
        }
        (folder / "site.yaml").write_text(yaml.safe_dump(policy))

    def write_job(self, name: str, **federation: object) -> Path:
        job = {
            "seed": 7,
            "model": {"name": "tiny-bert"},
            "lora": {"r": 4, "alpha": 8},
            "train": {"local_steps": 3, "batch_size": 16, "max_length": 24,
                      "learning_rate": 0.05},
            "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5},
            "data": {"at_sites": True, "labels": list(INTENTS)},
            "federation": {"sites": list(SITES), "rounds": 3, "min_sites": 2,
                           "round_timeout_s": 40, "connect_timeout_s": 90, **federation},
        }  # fmt: skip
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    # -- processes -----------------------------------------------------------------------------

    def _spawn(self, key: str, args: list[str], log: Path) -> subprocess.Popen:
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                [FEDSLM, *args], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[key] = proc
        self._note(proc.pid)
        return proc

    def _note(self, pid: int) -> None:
        for p in self._tree(pid):
            self.seen.setdefault(p.pid, p)

    def start_coordinator(self) -> None:
        log = self.root / "coordinator" / "start.log"
        self._spawn("coordinator", ["coordinator", "start", "--config", str(self.config)], log)
        _wait("the coordinator", lambda: "coordinator up" in log.read_text(), 90)

    def start_site(self, name: str) -> subprocess.Popen:
        log = self.site_dir(name) / "daemon.out"
        return self._spawn(
            name, ["site", "start", "--policy", str(self.site_dir(name) / "site.yaml")], log
        )

    def kill(self, key: str) -> None:
        """SIGKILL a process and everything under it: a crash, not a shutdown."""
        proc = self.procs.pop(key)
        tree = self._tree(proc.pid)
        for p in tree:
            self.seen.setdefault(p.pid, p)
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=15)
        proc.wait(5)

    @staticmethod
    def _tree(pid: int) -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
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
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(list(self.seen.values()), timeout=10)
        return [p.pid for p in self.seen.values() if _alive(p)]

    # -- runs -----------------------------------------------------------------------------------

    def run(self, job: Path, name: str) -> Path:
        _cli("coordinator", "run", str(job), "--name", name, "--config", str(self.config))
        return self.root / "coordinator" / "state" / "runs" / name

    def status(self, name: str) -> dict:
        return json.loads((self.run_dir(name) / "status.json").read_text())

    def run_dir(self, name: str) -> Path:
        return self.root / "coordinator" / "state" / "runs" / name

    def wait_finished(self, name: str, timeout: float) -> dict:
        def done() -> dict | None:
            path = self.run_dir(name) / "status.json"
            if not path.exists():
                return None
            st = json.loads(path.read_text())
            return st if st["state"] in ("finished", "failed") else None

        try:
            status = _wait(f"run {name} to end", done, timeout, every=1.0)
        except AssertionError:
            print(_cli("coordinator", "logs", name, "--config", str(self.config),
                       check=False).stdout[-4000:])  # fmt: skip
            raise
        assert status["state"] == "finished", status
        return status

    def rounds_done(self, name: str) -> list[dict]:
        path = self.run_dir(name) / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ledger_rounds(ledger: Path, job_id: str) -> list[int]:
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT round FROM entries WHERE job_id = ?", (job_id,)).fetchall()
    return sorted(int(r[0]) for r in rows)


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("deploy"))
    try:
        c.setup()
        c.start_coordinator()
        c.register_sites()
        for name in SITES:
            c.start_site(name)
        yield c
    finally:
        alive = c.stop_all()
        assert not alive, f"processes left running: {alive}"


def test_unregistered_site_is_refused(cluster: Cluster) -> None:
    proc = cluster.start_site("site-x")
    code = proc.wait(120)
    out = (cluster.site_dir("site-x") / "daemon.out").read_text()
    assert code != 0
    assert "not registered" in out and "add-site" in out, out[-2000:]


def test_run_and_resume_after_coordinator_crash(cluster: Cluster) -> None:
    job = cluster.write_job("job")
    a = cluster.run(job, "uninterrupted")
    cluster.wait_finished("uninterrupted", 300)
    rounds = cluster.rounds_done("uninterrupted")
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["aggregated"] for r in rounds)
    assert all(set(r["sites"]) >= set(SITES) for r in rounds)

    b = cluster.run(job, "interrupted")
    _wait("round 1 of the interrupted run", lambda: cluster.rounds_done("interrupted"), 200)
    cluster.kill("coordinator")  # SuperLink, ServerApp and proxy die mid-run
    assert len(cluster.rounds_done("interrupted")) < 3
    cluster.start_coordinator()
    _cli("coordinator", "resume", "interrupted", "--config", str(cluster.config))
    cluster.wait_finished("interrupted", 300)

    rounds = cluster.rounds_done("interrupted")
    assert sorted({r["round"] for r in rounds if r["aggregated"]}) == [1, 2, 3]
    want, got = _adapter(a), _adapter(b)
    assert want.keys() == got.keys()
    for k in want:
        assert (want[k] - got[k]).abs().max().item() < 1e-5, k
    # no spend counted twice: each site's epsilon for the resumed job equals the
    # uninterrupted job's, at the coordinator and in the site's own ledger
    pa = json.loads((a / "privacy.json").read_text())["sites"]
    pb = json.loads((b / "privacy.json").read_text())["sites"]
    job_b = json.loads((b / "job.json").read_text())["job_id"]
    for site in SITES:
        assert pb[site]["dp_steps"] == pa[site]["dp_steps"], site
        assert abs(pb[site]["epsilon"] - pa[site]["epsilon"]) < 1e-9, site
        assert _ledger_rounds(cluster.site_dir(site) / "ledger.db", job_b) == [1, 2, 3], site


def test_site_killed_mid_round_rejoins(cluster: Cluster) -> None:
    job = cluster.write_job("job-kill")
    run = cluster.run(job, "site-killed")
    log = cluster.site_dir("site-c") / "state" / "daemon.log"
    before = log.read_text() if log.exists() else ""
    _wait("site-c to start training", lambda: log.read_text().count("train") >
          before.count("train"), 200)  # fmt: skip
    cluster.kill("site-c")
    _wait("round 1 without site-c", lambda: cluster.rounds_done("site-killed"), 200)
    first = cluster.rounds_done("site-killed")[0]
    assert first["aggregated"] and "site-c" not in first["sites"], first
    cluster.start_site("site-c")  # same key, same identity
    cluster.wait_finished("site-killed", 300)
    rounds = cluster.rounds_done("site-killed")
    assert any("site-c" in r["sites"] for r in rounds[1:]), "site-c did not rejoin"
    verify = _cli("ledger", "verify", str(cluster.site_dir("site-c") / "ledger.db"))
    assert "ok" in verify.stdout.lower(), verify.stdout
    assert (run / "privacy.json").exists()
