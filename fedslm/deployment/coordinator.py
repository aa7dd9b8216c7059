"""``fedslm coordinator ...``: the coordinator service on Flower's deployment engine.

``start`` runs Flower's SuperLink on the coordinator's private interface (TLS, SuperNode
authentication, state in SQLite, no run-time dependency installation) and the nginx proxy
that is the only thing sites reach. The other commands talk to the SuperLink's admin API with
Flower's own CLI (``flwr``), configured in ``STATE/flwr/config.toml``: registering sites,
submitting, inspecting and stopping runs. Each run has a folder ``STATE/runs/NAME`` with the
job and every output, so ``resume`` can continue it after the coordinator was stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from fedslm import __version__
from fedslm.artifacts import write_json, write_text
from fedslm.deployment.config import CoordinatorSettings
from fedslm.errors import ConfigError, FedSLMError

FEDERATION = "fedslm"  # the name of the SuperLink connection in STATE/flwr/config.toml
SITES_FILE = "sites.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CoordinatorError(FedSLMError):
    """A coordinator command could not do what it was asked; the message says why."""


@dataclass(frozen=True)
class Paths:
    """Where the coordinator keeps things under ``state_dir``."""

    state: Path

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr"

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def runs(self) -> Path:
        return self.state / "runs"

    @property
    def app(self) -> Path:
        return self.state / "app"

    @property
    def sites(self) -> Path:
        return self.state / SITES_FILE

    @property
    def pid(self) -> Path:
        return self.state / "coordinator.pid"

    @property
    def started(self) -> Path:
        return self.state / "superlink.started"


def flwr_env(settings: CoordinatorSettings) -> dict[str, str]:
    """The environment of every Flower program the coordinator starts: its own Flower home
    (config, apps), no telemetry, no update check, no run-time dependency installation."""
    env = dict(os.environ)
    # the SuperLink starts further Flower programs by name (flower-superexec, flwr-serverapp):
    # they must be the ones installed with this fedslm, whether or not its venv is on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(Paths(settings.state).flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    return env


def _bin(name: str) -> str:
    # the Flower programs installed next to this interpreter (a venv need not be on PATH)
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def superlink_command(settings: CoordinatorSettings) -> list[str]:
    """The ``flower-superlink`` command line for ``settings``."""
    tls, link = settings.tls, settings.superlink
    return [
        _bin("flower-superlink"),
        "--ssl-ca-certfile", tls.ca_cert,
        "--ssl-certfile", tls.cert,
        "--ssl-keyfile", tls.key,
        "--enable-supernode-auth",
        "--database", str(Paths(settings.state).database),
        "--disable-runtime-dependency-installation",
        "--isolation", "subprocess",
        "--host", link.host,
        "--port", str(link.port),
    ]  # fmt: skip


def write_flwr_config(settings: CoordinatorSettings) -> Path:
    """Point Flower's CLI at this coordinator's SuperLink (admin API, private interface).

    The admin connects to ``superlink.host``; ``127.0.0.1`` must then be in the server
    certificate's SANs (``fedslm certs --host 127.0.0.1``)."""
    link = settings.superlink
    host = "127.0.0.1" if link.host in ("0.0.0.0", "::") else link.host
    path = Paths(settings.state).flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(
        path,
        "# written by `fedslm coordinator`; edits are overwritten\n"
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "{host}:{link.port}"\nroot-certificates = "{settings.tls.ca_cert}"\n',
    )
    return path


def write_app(settings: CoordinatorSettings) -> Path:
    """The Flower app that ``run`` submits: only a ``pyproject.toml`` naming the ServerApp and
    ClientApp in the installed fedslm (the code that runs at a site is the site's own installed
    fedslm; the version here is what sites check)."""
    from importlib.metadata import version

    folder = Paths(settings.state).app
    folder.mkdir(parents=True, exist_ok=True)
    flwr = version("flwr")
    write_text(
        folder / "pyproject.toml",
        f"""# written by `fedslm coordinator run`: the app every site runs from its own fedslm
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedslm-app"
version = "{__version__}"
description = "fedslm federated LoRA fine-tuning"
dependencies = ["fedslm=={__version__}", "flwr=={flwr}"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedslm"

[tool.flwr.app.components]
serverapp = "fedslm.server.app:app"
clientapp = "fedslm.clients.app:app"

[tool.flwr.app.config]
run-dir = ""
resume = false
""",
    )
    return folder


def flwr(settings: CoordinatorSettings, *args: str, json_output: bool = True) -> Any:
    """Run Flower's CLI against this coordinator; JSON output parsed, errors explained."""
    write_flwr_config(settings)
    cmd = [_bin("flwr"), *args, FEDERATION] + (["--format", "json"] if json_output else [])
    proc = subprocess.run(
        cmd, env=flwr_env(settings), capture_output=True, text=True, timeout=120, check=False
    )
    if not json_output:
        if proc.returncode != 0:
            raise CoordinatorError(_flwr_failure(cmd, proc))
        return proc.stdout
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise CoordinatorError(_flwr_failure(cmd, proc)) from None
    if not out.get("success", False):
        raise CoordinatorError(
            f"`{' '.join(cmd[:3])}` failed: {out.get('error-message') or out}"
            + _not_running_hint(settings, str(out))
        )
    return out


def _flwr_failure(cmd: Sequence[str], proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return f"`{' '.join(cmd[:3])}` failed (exit {proc.returncode}): " + " / ".join(text[-5:])


def _not_running_hint(settings: CoordinatorSettings, text: str) -> str:
    if "connect" in text.lower() or "unavailable" in text.lower():
        link = settings.superlink
        return (
            f" (is the coordinator running? nothing answered on {link.host}:{link.port}; "
            "start it with `fedslm coordinator start --config FILE`)"
        )
    return ""


# -- start -------------------------------------------------------------------------------------


def check_tls_files(settings: CoordinatorSettings) -> None:
    """The TLS files exist and the server certificate is for 127.0.0.1 (the admin commands
    and the proxy reach the SuperLink over loopback) and still valid."""
    from cryptography import x509

    tls = settings.tls
    for key, value in (("tls.ca_cert", tls.ca_cert), ("tls.cert", tls.cert), ("tls.key", tls.key)):
        if not Path(value).is_file():
            raise ConfigError(f"{key}: {value} does not exist (make it with `fedslm certs`)")
    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise ConfigError(
            f"tls.cert: {tls.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "make a new one with `fedslm certs`"
        )
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        ips = set()
    if "127.0.0.1" not in ips:
        raise ConfigError(
            f"tls.cert: {tls.cert} has no 127.0.0.1 subject alternative name; the proxy and "
            "the admin commands reach the SuperLink over loopback (`fedslm certs --host "
            "127.0.0.1 --host YOUR-NAME`)"
        )


def wait_for_tls(
    host: str,
    port: int,
    ca_cert: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until ``host:port`` completes a TLS handshake verified against ``ca_cert``; fail
    at once if ``proc`` (the server being waited for) exits, quoting the end of its ``log``."""
    context = ssl.create_default_context(cafile=ca_cert)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log else []
            raise CoordinatorError(
                f"{_program(proc)} exited with code {proc.returncode} before "
                f"serving {host}:{port}" + (f"; {log}: " + " / ".join(tail) if tail else "")
            )
        try:
            with (
                socket.create_connection((host, port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname=host),
            ):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.3)
    raise CoordinatorError(f"{host}:{port} did not answer with TLS within {timeout:.0f} s: {last}")


def start(settings: CoordinatorSettings) -> int:
    """Run the SuperLink and the proxy until one of them stops or a signal arrives."""
    paths = Paths(settings.state)
    check_tls_files(settings)
    for folder in (paths.state, paths.logs, paths.runs):
        folder.mkdir(parents=True, exist_ok=True)
    _refuse_second_instance(paths)
    write_flwr_config(settings)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    write_text(paths.pid, f"{os.getpid()}\n")
    # runs Flower still lists as running but submitted before this start died with the
    # previous SuperLink: `resume` may stop them (see ``resume``)
    write_text(paths.started, f"{time.time()}\n")
    try:
        superlink_log = paths.logs / "superlink.log"
        procs["superlink"] = _spawn(
            partial(subprocess.Popen, superlink_command(settings)), superlink_log, settings
        )
        link = settings.superlink
        host = "127.0.0.1" if link.host in ("0.0.0.0", "::") else link.host
        wait_for_tls(host, link.port, settings.tls.ca_cert, 60, procs["superlink"], superlink_log)
        if settings.proxy.enabled:
            from fedslm.deployment.proxy import start_proxy

            # writes the configuration and runs nginx -t first: nginx's own message if it is
            # refused, before anything listens
            proxy_log = paths.logs / "proxy.log"
            procs["proxy"] = _spawn(partial(start_proxy, settings), proxy_log, settings)
            p = settings.proxy
            public = "127.0.0.1" if p.host in ("0.0.0.0", "::") else p.host
            wait_for_tls(public, p.port, settings.tls.ca_cert, 30, procs["proxy"], proxy_log)
        _say(
            f"coordinator up: SuperLink on {link.host}:{link.port} (private), "
            + (
                f"site API on {settings.proxy.host}:{settings.proxy.port} via the proxy"
                if settings.proxy.enabled
                else "NO proxy (the admin API shares the SuperLink's port: keep it private)"
            )
            + f"; state in {paths.state}"
        )
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    _say(f"{name} exited with code {proc.returncode}; see {paths.logs}/{name}.log")
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        for proc in procs.values():
            _terminate(proc)
        paths.pid.unlink(missing_ok=True)


def _refuse_second_instance(paths: Paths) -> None:
    if paths.pid.exists():
        try:
            pid = int(paths.pid.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            return  # a stale pid file from a process that is gone
        raise CoordinatorError(f"a coordinator (pid {pid}) is already running on {paths.state}")


def _program(proc: subprocess.Popen[Any]) -> str:
    """The file name of the program ``proc`` runs (for messages)."""
    args = proc.args
    first = args[0] if isinstance(args, list | tuple) else args
    return Path(str(first)).name


def _spawn(
    start: Callable[..., subprocess.Popen[Any]], log: Path, settings: CoordinatorSettings
) -> subprocess.Popen[Any]:
    """``start(**popen_options)`` with output appended to ``log``, Flower's environment, and a
    session of its own (a Ctrl-C at the terminal reaches only the coordinator, which stops it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return start(
            stdout=fh, stderr=subprocess.STDOUT, env=flwr_env(settings), start_new_session=True
        )


def _terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _say(text: str) -> None:
    print(f"[coordinator] {text}", flush=True)


# -- sites -------------------------------------------------------------------------------------


def read_sites(settings: CoordinatorSettings) -> dict[str, dict[str, Any]]:
    """The registered sites: name -> public key, fingerprint, Flower node id, when added."""
    path = Paths(settings.state).sites
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def add_site(settings: CoordinatorSettings, name: str, public_key: Path) -> dict[str, Any]:
    """Register site ``name`` with its public key (from ``fedslm site keygen``)."""
    from fedslm.keys import fingerprint, load_public_key

    if not _NAME.match(name):
        raise ConfigError(
            f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 64 characters)"
        )
    try:
        text = public_key.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{public_key}: public key file not found") from None
    key = load_public_key(text, str(public_key))
    fp = fingerprint(key)
    sites = read_sites(settings)
    if name in sites:
        raise CoordinatorError(f"site {name!r} is already registered (remove-site it first)")
    for other, entry in sites.items():
        if entry["fingerprint"] == fp:
            raise CoordinatorError(f"this key is already registered as site {other!r}")
    out = flwr(settings, "supernode", "register", str(public_key))
    sites[name] = {
        "public_key": text,
        "fingerprint": fp,
        "node_id": int(out["node-id"]),
        "added": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(Paths(settings.state).sites, sites)
    return sites[name]


def remove_site(settings: CoordinatorSettings, name: str) -> None:
    """Unregister site ``name``: its key is refused from now on."""
    sites = read_sites(settings)
    if name not in sites:
        raise CoordinatorError(f"no site {name!r} is registered (registered: {sorted(sites)})")
    flwr(settings, "supernode", "unregister", str(sites[name]["node_id"]))
    del sites[name]
    write_json(Paths(settings.state).sites, sites)


def site_status(settings: CoordinatorSettings) -> list[dict[str, Any]]:
    """Each registered site with its Flower status (online, offline, registered)."""
    nodes = {int(n["node-id"]): n for n in flwr(settings, "supernode", "ls").get("nodes", [])}
    return [
        {
            "name": name,
            "node_id": entry["node_id"],
            "fingerprint": entry["fingerprint"],
            "status": nodes.get(int(entry["node_id"]), {}).get("status", "unknown"),
        }
        for name, entry in sorted(read_sites(settings).items())
    ]


# -- runs --------------------------------------------------------------------------------------


def submit(settings: CoordinatorSettings, job_path: Path, name: str | None) -> Path:
    """Validate ``job_path`` for the registered sites, create its run folder, submit it."""
    from fedslm.config import load_config
    from fedslm.deployment.runs import DeployedRun, RosterEntry
    from fedslm.job import PreparedJob

    job = load_config(job_path)
    if not job.data.at_sites:
        raise ConfigError(
            f"{job_path}: data: a deployed job reads each site's own data; set "
            "data.at_sites: true (and data.labels for classification) instead of "
            "data.path / data.sites / data.synthetic"
        )
    labels = list(job.data.labels or [])
    if job.task.type == "classification" and len(labels) < 2:
        raise ConfigError(
            f"{job_path}: data.labels: a deployed classification job lists its labels "
            "(the coordinator never sees the sites' data to infer them)"
        )
    if not isinstance(job.federation.sites, list):
        raise ConfigError(
            f"{job_path}: federation.sites: name the registered sites that take part "
            f"(registered: {sorted(read_sites(settings))})"
        )
    sites = read_sites(settings)
    missing = [s for s in job.federation.sites if s not in sites]
    if missing:
        raise ConfigError(
            f"{job_path}: federation.sites: {missing} are not registered "
            f"(registered: {sorted(sites)}); `fedslm coordinator add-site NAME site.pub`"
        )
    model = resolve_model_for(settings, job)
    name = name or f"{job_path.stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if not _NAME.match(name):
        raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' or '-'")
    run_dir = Paths(settings.state).runs / name
    if run_dir.exists():
        raise CoordinatorError(f"run {name!r} exists ({run_dir}); choose another --name")
    run_dir.mkdir(parents=True)
    job_id = f"{job.fingerprint()[:12]}-{name}"
    prepared = PreparedJob(job, str(job_path), run_dir, job_id, [], labels, model)
    roster = [
        RosterEntry(s, int(sites[s]["node_id"]), sites[s]["public_key"])
        for s in job.federation.sites
    ]
    DeployedRun(prepared, roster).save()
    _submit_flower_run(settings, run_dir, resume=False)
    return run_dir


def resolve_model_for(settings: CoordinatorSettings, job: Any) -> Any:
    """The job's base model on the coordinator: ``models`` of the service file, else a
    packaged model or ``model.path``."""
    from fedslm.models.registry import resolve_model

    cfg = job.model
    if cfg.path is None and cfg.name in settings.models:
        cfg = cfg.model_copy(update={"path": settings.models[cfg.name]})
    return resolve_model(cfg)


def _submit_flower_run(settings: CoordinatorSettings, run_dir: Path, resume: bool) -> int:
    app = write_app(settings)
    out = flwr(
        settings, "run", str(app),
        "--run-config", f'run-dir="{run_dir}" resume={"true" if resume else "false"}',
    )  # fmt: skip
    run_id = int(out["run-id"])
    ids_file = run_dir / "flower_runs.json"
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else []
    ids.append({"run_id": run_id, "resume": resume, "submitted": time.time()})
    write_json(ids_file, ids)
    return run_id


def run_folder(settings: CoordinatorSettings, name: str) -> Path:
    """The folder of run ``name``; a clear error if there is none."""
    folder = Paths(settings.state).runs / name
    if not (folder / "job.json").exists():
        known = sorted(p.name for p in Paths(settings.state).runs.glob("*") if p.is_dir())
        raise CoordinatorError(f"no run {name!r} (runs: {known})")
    return folder


def flower_run_id(run_dir: Path) -> int:
    """The Flower run id of the run folder's latest submission."""
    ids = json.loads((run_dir / "flower_runs.json").read_text())
    return int(ids[-1]["run_id"])


def run_status(settings: CoordinatorSettings, name: str | None) -> list[dict[str, Any]]:
    """Each run (or one): the ServerApp's own status, rounds done, and Flower's status."""
    from fedslm.deployment.runs import read_status

    runs_dir = Paths(settings.state).runs
    names = [name] if name else sorted(p.name for p in runs_dir.glob("*") if p.is_dir())
    flower: dict[int, str] = {}
    try:
        for r in flwr(settings, "ls").get("runs", []):
            flower[int(r["run-id"])] = str(r.get("status", "?"))
    except CoordinatorError:
        pass  # the SuperLink is down: show what the run folders say
    rows = []
    for n in names:
        folder = run_folder(settings, n)
        status = read_status(folder)
        rounds = _rounds_done(folder)
        job = json.loads((folder / "job.json").read_text())
        total = job["config"]["federation"]["rounds"]
        rid = flower_run_id(folder) if (folder / "flower_runs.json").exists() else None
        rows.append(
            {
                "run": n,
                "state": status.get("state"),
                "rounds": f"{rounds}/{total}",
                "flower_run_id": rid,
                "flower_status": flower.get(rid, "unknown") if rid is not None else "-",
                "reason": status.get("reason", ""),
            }
        )
    return rows


def _rounds_done(folder: Path) -> int:
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        return 0
    done = 0
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("aggregated"):
            done = max(done, int(rec["round"]))
    return done


def resume(settings: CoordinatorSettings, name: str) -> int:
    """Submit run ``name`` again; the ServerApp continues after its last completed round.

    A run whose coordinator was killed is still listed as running by the restarted
    SuperLink; it cannot be (its ServerApp died with the old SuperLink), so it is stopped
    first. A run submitted since this SuperLink started may really be running: refused.
    """
    from fedslm.deployment.runs import read_status

    folder = run_folder(settings, name)
    status = read_status(folder)
    if status.get("state") == "finished":
        raise CoordinatorError(f"run {name!r} has finished; there is nothing to resume")
    ids = json.loads((folder / "flower_runs.json").read_text())
    rid, submitted = int(ids[-1]["run_id"]), float(ids[-1]["submitted"])
    started_file = Paths(settings.state).started
    started = float(started_file.read_text()) if started_file.exists() else 0.0
    for r in flwr(settings, "ls").get("runs", []):
        if int(r["run-id"]) != rid or not str(r.get("status", "")).startswith("running"):
            continue
        if submitted >= started:
            raise CoordinatorError(
                f"run {name!r} is still running (Flower run {rid}); stop it first "
                f"(`fedslm coordinator stop {name}`)"
            )
        flwr(settings, "stop", str(rid))  # orphaned by the coordinator's restart
    return _submit_flower_run(settings, folder, resume=True)


def stop_run(settings: CoordinatorSettings, name: str) -> int:
    """Stop run ``name`` (its latest Flower run); it can be resumed later."""
    folder = run_folder(settings, name)
    rid = flower_run_id(folder)
    flwr(settings, "stop", str(rid))
    return rid


def run_logs(settings: CoordinatorSettings, name: str) -> str:
    """The ServerApp's log of run ``name`` (every submission, oldest first)."""
    folder = run_folder(settings, name)
    ids = json.loads((folder / "flower_runs.json").read_text())
    parts = []
    for entry in ids:
        text = flwr(settings, "log", str(entry["run_id"]), "--show", json_output=False)
        parts.append(f"--- Flower run {entry['run_id']} ---\n{text}")
    return "\n".join(parts)
