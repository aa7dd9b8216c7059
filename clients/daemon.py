"""``fedslm site start --policy site.yaml``: a deployed site's daemon.

One long-lived process per site: the site worker (``fedslm.clients.worker``: model, data,
policy, ledger; loads nothing until the first job arrives) listening on a Unix socket in the
daemon's ``state_dir``, and Flower's SuperNode as a child process that dials out to the
coordinator over TLS with the site's key and hands every message to a thin ClientApp, which
forwards it to the worker.

Before anything starts, a pre-flight opens a TLS connection to the coordinator with the
consortium CA and a host name check, so a wrong CA, an expired certificate, a host name that
is not in the certificate, or nothing listening is reported in one clear sentence instead of a
SuperNode retrying forever. When the SuperNode exits on its own the daemon says why (exit 305
after a good pre-flight: this site's key is not registered at the coordinator) and exits
non-zero; SIGTERM or SIGINT stop both parts cleanly.

Files in ``state_dir``: ``worker.sock`` (mode 0660), ``daemon.pid``, ``daemon.log`` (one line
per job, round and message handled), ``supernode.log`` (the SuperNode's own output),
``site.secret``, ``jobs/`` and ``releases/`` (the worker's).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from fedslm.deployment.config import DaemonSettings
from fedslm.errors import ConfigError, FedSLMError
from fedslm.policy import SitePolicy, load_policy

PREFLIGHT_TIMEOUT_S = 10.0
GRACE_S = 10.0  # between SIGTERM and SIGKILL of a child
POLL_S = 0.5
# Flower's SuperLink counts a node online until 2 heartbeats (30 s apart) are missed, and
# refuses to activate it again meanwhile: a site restarted after a crash waits that long
RETRY_WINDOW_S = 90.0
RETRY_EVERY_S = 10.0
_CONNECTION_ERROR = 305  # flwr ExitCode.SUPERNODE_CONNECTION_ERROR
PID_FILE, DAEMON_LOG, SUPERNODE_LOG = "daemon.pid", "daemon.log", "supernode.log"
EXECUTOR_LOG, EXECUTOR_SECRET = "executor.log", "executor.secret"

# OpenSSL X509_V_ERR_* codes the pre-flight explains
_EXPIRED, _NOT_YET_VALID = 10, 9
_UNKNOWN_ISSUER = (2, 7, 18, 19, 20, 21)  # 7: a CA of the same name signed it
_NAME_MISMATCH = (62, 64)


class DaemonError(FedSLMError):
    """The daemon cannot start, or its SuperNode stopped; the message says what to do."""


class DaemonLog:
    """Timestamped lines to stdout and to ``state_dir/daemon.log``."""

    def __init__(self, path: Path, stream: TextIO | None = None) -> None:
        self.path = path
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        """Write one line (several for a multi-line message)."""
        stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        text = "".join(f"{stamp} {part}\n" for part in line.splitlines() or [""])
        with self._lock:
            self.stream.write(text)
            self.stream.flush()
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(text)


# -- pre-flight ----------------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ``ConfigError`` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"daemon.coordinator: {text!r} is not host:port (e.g. coordinator.example.org:9092)"
        )
    return host, int(port)


def preflight(address: str, ca_cert: Path, timeout: float = PREFLIGHT_TIMEOUT_S) -> str:
    """Open a TLS connection to ``address`` that trusts only ``ca_cert`` and checks the host
    name, as the SuperNode will; return a description of the coordinator's certificate.

    Raises ``DaemonError`` saying what is wrong and what to do: unknown CA, an expired (or not
    yet valid) certificate, a host name the certificate does not name, nothing listening, no
    answer, or a server that does not speak TLS.
    """
    host, port = parse_address(address)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    except FileNotFoundError:
        raise DaemonError(f"daemon.ca_cert: {ca_cert} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise DaemonError(
            f"daemon.ca_cert: {ca_cert} is not a PEM CA certificate ({exc}); use the ca.crt the "
            "coordinator operator gave you (from `fedslm certs`)"
        ) from None
    where = f"{host}:{port}"
    raw = _connect(host, port, timeout)
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise DaemonError(_verify_failure(exc, host, port, ca_cert, timeout)) from None
    except ssl.SSLError as exc:
        raise DaemonError(
            f"{where} does not speak TLS ({exc.reason or exc}): daemon.coordinator must be the "
            "coordinator's TLS address for sites (its proxy), not a plain HTTP or other port"
        ) from None
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise DaemonError(
            f"{where} accepted the connection but did not complete a TLS handshake "
            f"({exc or type(exc).__name__}); it does not look like the coordinator's TLS "
            "address: check daemon.coordinator"
        ) from None
    finally:
        raw.close()
    return _describe_der(der) if der else "(no certificate)"


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    where = f"{host}:{port}"
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise DaemonError(
            f"daemon.coordinator: cannot resolve host name {host!r} ({exc.strerror}); check the "
            "name, or this machine's DNS"
        ) from None
    except ConnectionRefusedError:
        raise DaemonError(
            f"nothing is listening at {where} (connection refused): is the coordinator "
            "running, and is daemon.coordinator its address for sites?"
        ) from None
    except TimeoutError:
        raise DaemonError(
            f"no answer from {where} within {timeout:g} s: a firewall between this site and "
            "the coordinator, or a wrong address in daemon.coordinator"
        ) from None
    except OSError as exc:
        raise DaemonError(f"cannot reach {where}: {exc.strerror or exc}") from None


def _verify_failure(
    exc: ssl.SSLCertVerificationError, host: str, port: int, ca_cert: Path, timeout: float
) -> str:
    """What a certificate verification failure means, with the certificate's own facts."""
    peer = _peek_certificate(host, port, timeout)
    seen = f" It presents: {peer}." if peer else ""
    code = exc.verify_code
    if code == _EXPIRED:
        ca_note = ""
        ca_expiry = _ca_expiry(ca_cert)
        if ca_expiry is not None and ca_expiry < dt.datetime.now(dt.UTC):
            ca_note = f" The CA certificate {ca_cert} itself expired on {ca_expiry:%Y-%m-%d}."
        return (
            f"the coordinator's TLS certificate at {host}:{port} has expired.{ca_note}{seen} "
            "Ask the coordinator operator to renew it (`fedslm certs`); check this machine's "
            "clock too"
        )
    if code == _NOT_YET_VALID:
        return (
            f"the coordinator's TLS certificate at {host}:{port} is not valid yet.{seen} Check "
            "this machine's clock (NTP)"
        )
    if code in _NAME_MISMATCH:
        return (
            f"the coordinator's TLS certificate does not name {host!r}, the host in "
            f"daemon.coordinator.{seen} Use one of the names it lists in daemon.coordinator, or "
            f"ask the coordinator operator for a certificate that includes {host} (`fedslm certs "
            f"--host {host}`)"
        )
    if code in _UNKNOWN_ISSUER:
        return (
            f"the coordinator's TLS certificate at {host}:{port} is not signed by the CA in "
            f"daemon.ca_cert ({ca_cert}).{seen} Get the consortium's CA certificate (ca.crt) "
            "from the coordinator operator; if it is the right one, you may be talking to "
            "something else than the coordinator"
        )
    return (
        f"the coordinator's TLS certificate at {host}:{port} failed verification: "
        f"{exc.verify_message} (OpenSSL code {code}).{seen}"
    )


def _peek_certificate(host: str, port: int, timeout: float) -> str:
    """The server's certificate, described, fetched without verification (for messages only:
    nothing is sent over this connection)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=_sni(host)) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return ""
    return _describe_der(der) if der else ""


def _sni(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None  # no SNI for an IP address


def _describe_der(der: bytes) -> str:
    from cryptography import x509

    from fedslm.certs import describe

    return describe(x509.load_der_x509_certificate(der))


def _ca_expiry(path: Path) -> dt.datetime | None:
    from fedslm.certs import CertError, read_certificate

    try:
        return read_certificate(path).not_valid_after_utc
    except CertError:
        return None


# -- settings ------------------------------------------------------------------------------------


def check_settings(policy: SitePolicy, source: Path) -> DaemonSettings:
    """The policy's daemon section, with every file it names checked; ``ConfigError`` naming
    the key otherwise."""
    from fedslm.keys import SiteKeyError, load_private_key

    settings = policy.daemon
    if settings is None:
        raise ConfigError(
            f"{source}: no daemon section; `fedslm site start` needs daemon.name, "
            "daemon.coordinator, daemon.ca_cert, daemon.key and daemon.state_dir"
        )
    if policy.data is None:
        raise ConfigError(f"{source}: data: is not set; the site trains on this file")
    if not Path(policy.data).is_file():
        raise ConfigError(f"{source}: data: {policy.data} is not a file")
    parse_address(settings.coordinator)
    if not Path(settings.ca_cert).is_file():
        raise ConfigError(f"{source}: daemon.ca_cert: {settings.ca_cert} does not exist")
    try:
        load_private_key(Path(settings.key))
    except (SiteKeyError, OSError) as exc:
        raise ConfigError(
            f"{source}: daemon.key: {exc} (make one with `fedslm site keygen`)"
        ) from None
    for name, folder in settings.models.items():
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(
                f"{source}: daemon.models.{name}: {folder} is not a Hugging Face model folder"
            )
    return settings


def supernode_command(
    settings: DaemonSettings,
    socket_path: Path,
    secret_file: Path,
    launcher: list[str] | None = None,
) -> list[str]:
    """The SuperNode's command line: TLS with the consortium CA (never ``--insecure``), the
    site's key, the worker's socket in its node config, its runtime API on loopback for the
    executor (``--isolation process``, authenticated by ``secret_file``).

    ``launcher`` runs Flower's SuperNode (default: ``fedslm.clients.supernode`` with the
    policy's poll intervals). Runtime dependency installation stays off (the SuperNode's
    default): the ClientApp code that runs is this site's installed fedslm.
    """
    for what, value in (("daemon.state_dir", str(socket_path)), ("daemon.name", settings.name)):
        # Flower reads --node-config values as TOML basic strings
        if any(c in value for c in '"\\\n'):
            raise ConfigError(f"{what}: {value!r} must not contain a quote, backslash or newline")
    if launcher is None:
        launcher = [sys.executable, "-m", "fedslm.clients.supernode",
                    "--poll-interval", f"{settings.poll_interval_s:g}",
                    "--idle-poll-interval", f"{settings.idle_poll_interval_s:g}"]  # fmt: skip
    return [
        *launcher,
        "--superlink", settings.coordinator,
        "--root-certificates", str(settings.ca_cert),
        "--auth-supernode-private-key", str(settings.key),
        "--node-config", f'worker="{socket_path}" site="{settings.name}"',
        "--isolation", "process",
        "--superexec-auth-secret-file", str(secret_file),
        "--host", "127.0.0.1",
        "--port", str(settings.runtime_port),
    ]  # fmt: skip


def executor_command(settings: DaemonSettings, secret_file: Path) -> list[str]:
    """The ClientApp executor's command line (``fedslm.clients.executor``): it takes the
    SuperNode's tasks from its loopback runtime API and exits when the daemon is gone."""
    return [
        sys.executable, "-m", "fedslm.clients.executor",
        "--runtime-api", f"127.0.0.1:{settings.runtime_port}",
        "--secret-file", str(secret_file),
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip


def write_secret(path: Path) -> None:
    """A fresh random secret for the SuperNode and the executor, readable by this user only."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))


def explain_exit(
    status: int, settings: DaemonSettings, output: str, connected_before: bool = False
) -> str:
    """Why the SuperNode exited with ``status``, and what to do; ``output`` is what it wrote
    since it started, ``connected_before`` whether this site's key was ever accepted.

    Flower logs its own exit code ("Exit Code: 305") but the process may end with another
    status (1 in Flower 1.41, after its web server shuts down), and a status has only 8 bits
    (305 would arrive as 49): the logged code wins.
    """
    from flwr.supercore.exit.exit_code import EXIT_CODE_HELP, ExitCode

    flower = _flower_code(status, output)
    if flower == status:
        flower = {c % 256: c for c in EXIT_CODE_HELP if c >= 256}.get(status, status)
    shown = f"{status} (Flower exit code {flower})" if flower != status else str(status)
    if flower == ExitCode.SUPERNODE_CONNECTION_ERROR:
        why = (
            "it could not connect to the coordinator. The pre-flight reached the coordinator "
            "over TLS, so the likely cause is that this site's key is not registered: ask the "
            "coordinator operator to run "
            f"`fedslm coordinator add-site {settings.name} site.pub` with this site's public "
            "key (the site.pub made with daemon.key)"
        )
        if connected_before:
            why = (
                f"the coordinator refused to activate this site for {RETRY_WINDOW_S:g} s "
                "although it accepted its key before: the key may have been removed "
                "(`fedslm coordinator remove-site`); ask the coordinator operator to run "
                f"`fedslm coordinator add-site {settings.name} site.pub` again"
            )
    elif flower == ExitCode.SUPERNODE_NODE_AUTH_KEY_INVALID:
        why = f"daemon.key ({settings.key}) is not a usable EC private key (`fedslm site keygen`)"
    elif flower in (ExitCode.GRACEFUL_EXIT_SIGQUIT, ExitCode.GRACEFUL_EXIT_SIGTERM):
        why = "it was stopped by a signal from outside the daemon"
    elif flower == ExitCode.GRACEFUL_EXIT_SIGINT:
        why = "it was interrupted (SIGINT), or it failed (see its log)"
    elif status < 0:
        why = f"it was killed by signal {-status}"
    else:
        why = EXIT_CODE_HELP.get(flower) or "see its log"
    lines = [x for x in output.splitlines() if x.strip()]
    marks = [i for i, x in enumerate(lines) if "Exit Code:" in x]
    # Flower's own explanation follows its exit code; otherwise the end of the log says most
    shown_lines = lines[marks[-1] : marks[-1] + 5] if marks else lines[-8:]
    tail = "\n".join("  " + x for x in shown_lines)
    last = f"\nlast lines of its log:\n{tail}" if tail else ""
    return f"the SuperNode exited with code {shown}: {why}{last}"


def _output_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    # Flower colours its log levels; the daemon's log is plain text
    return re.sub(r"\x1b\[[0-9;]*m", "", data.decode("utf-8", errors="replace"))


def _claim_pid_file(path: Path) -> None:
    """Write our pid; refuse when the file names another live daemon."""
    if path.exists():
        try:
            other = int(path.read_text().strip())
        except ValueError:
            other = 0
        if other > 0 and other != os.getpid():
            try:
                os.kill(other, 0)
            except ProcessLookupError:
                pass  # left by a daemon that died
            except PermissionError:
                raise DaemonError(f"{path}: another daemon (pid {other}) is running") from None
            else:
                raise DaemonError(
                    f"{path}: another daemon (pid {other}) is running for this state_dir; "
                    "stop it first"
                )
    path.write_text(f"{os.getpid()}\n")


# -- the daemon ----------------------------------------------------------------------------------


def start(policy_path: Path, *, supernode: str | None = None) -> int:
    """Run the site daemon until SIGTERM/SIGINT (exit 0) or until the SuperNode or the
    executor stops on its own (exit 1). Raises ``FedSLMError`` (nothing started) for a bad
    policy or a failed pre-flight. ``supernode`` replaces the SuperNode's launcher (tests)."""
    from fedslm.clients.worker import SOCKET_NAME, Worker

    policy = load_policy(policy_path)
    settings = check_settings(policy, policy_path)
    state = Path(settings.state_dir)
    secret = state / EXECUTOR_SECRET
    launcher = [supernode] if supernode else None
    command = supernode_command(settings, state / SOCKET_NAME, secret, launcher)
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    log = DaemonLog(state / DAEMON_LOG)
    pid_file = state / PID_FILE
    _claim_pid_file(pid_file)
    try:
        log(f"site {settings.name}: pre-flight TLS check of {settings.coordinator}")
        try:
            described = preflight(settings.coordinator, Path(settings.ca_cert))
        except DaemonError as exc:
            log(f"pre-flight failed: {exc}")
            raise
        log(f"coordinator certificate ok: {described}")
        worker = Worker(policy, log=log)
        worker.start()
        log(f"worker listening at {worker.socket_path}")
        try:
            write_secret(secret)
            return _run(settings, command, executor_command(settings, secret), state, log)
        finally:
            worker.stop()
            log("worker stopped")
            secret.unlink(missing_ok=True)
    finally:
        pid_file.unlink(missing_ok=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env.pop("FLWR_ALLOW_RUNTIME_DEPENDENCY_INSTALLATION", None)
    return env


def _spawn(command: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command`` with its output appended to ``log_path``; the process and the log's
    size before it started (where its output begins)."""
    with log_path.open("ab") as out:
        offset = out.tell()
        # its own session: a Ctrl-C in the terminal reaches the daemon, which stops it
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    return proc, offset


def _run(
    settings: DaemonSettings,
    command: list[str],
    executor: list[str],
    state: Path,
    log: DaemonLog,
) -> int:
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log_path, executor_log = state / SUPERNODE_LOG, state / EXECUTOR_LOG
    refused_since: float | None = None
    runner, runner_offset = _spawn(executor, executor_log)
    log(f"ClientApp executor started (pid {runner.pid})")
    proc: subprocess.Popen[bytes] | None = None
    try:
        while True:
            proc, offset = _spawn(command, log_path)
            log(f"SuperNode started (pid {proc.pid}), dialling {settings.coordinator}")
            exited = _watch({"supernode": proc, "executor": runner}, stop)
            if exited is None:
                break
            which, code = exited
            if which == "executor":
                output = _output_since(executor_log, runner_offset)
                tail = "\n".join("  " + x for x in output.splitlines()[-8:] if x.strip())
                log(f"the ClientApp executor exited with code {code}; last lines of its log "
                    f"({executor_log}):\n{tail}")  # fmt: skip
                return 1
            output = _output_since(log_path, offset)
            if "SuperNode ID:" in output:
                refused_since = None  # it was connected: a later refusal starts a new window
            if _flower_code(code, output) == _CONNECTION_ERROR and _connected_before(log_path):
                # This key was accepted before: most likely this site stopped without signing
                # off (a crash, a kill) and the coordinator counts it online until 2 missed
                # heartbeats (60 s) have passed. Try again for a while before giving up.
                now = time.monotonic()
                refused_since = refused_since if refused_since is not None else now
                if now - refused_since < RETRY_WINDOW_S:
                    log(
                        "the coordinator refused to activate this site, which was connected "
                        "before; it may still count this site's last session as online (for "
                        f"up to 60 s after a crash): trying again in {RETRY_EVERY_S:g} s"
                    )
                    if stop.wait(RETRY_EVERY_S):
                        break
                    continue
            log(explain_exit(code, settings, output, _connected_before(log_path)))
            return 1
        name = signal.Signals(received[0]).name if received else "stop"
        log(f"{name}: stopping the SuperNode and the executor")
        return 0
    finally:
        for p, what in ((proc, "SuperNode"), (runner, "ClientApp executor")):
            if p is not None:
                _terminate(p, what, log)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(
    procs: dict[str, subprocess.Popen[bytes]], stop: threading.Event
) -> tuple[str, int] | None:
    """Wait until one of ``procs`` exits (its key and status) or ``stop`` is set (None)."""
    while not stop.wait(POLL_S):
        for key, proc in procs.items():
            code = proc.poll()
            if code is None:
                continue
            if stop.wait(POLL_S):  # stopped along with us (e.g. systemd signals the group)
                return None
            return key, code
    return None


def _flower_code(status: int, output: str) -> int:
    """The exit code Flower logged (``Exit Code: N``), else the status."""
    logged = re.findall(r"Exit Code: (\d+)", output)
    return int(logged[-1]) if logged else status


def _connected_before(log_path: Path) -> bool:
    """Whether a SuperNode of this state_dir was ever accepted by the coordinator (it logs the
    node id it got)."""
    try:
        with log_path.open("rb") as fh:
            return any(b"SuperNode ID:" in line for line in fh)
    except OSError:
        return False


def _terminate(proc: subprocess.Popen[bytes], what: str, log: DaemonLog) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        log(f"the {what} did not stop within {GRACE_S:g} s; killing it")
        proc.kill()
        proc.wait()
    log(f"{what} stopped (exit code {proc.returncode})")
