"""``fedslm site start``: the pre-flight TLS check, the SuperNode's command and exits, shutdown.

A throwaway consortium CA and server certificates are made with ``fedslm.certs``; a small TLS
server in a thread stands in for the coordinator. The SuperNode is replaced by small scripts
(the real one is exercised by the end-to-end deployment test and the manual smoke in
docs/site-daemon.md).
"""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fedslm.clients.daemon import (
    DaemonError,
    DaemonLog,
    _run,
    explain_exit,
    parse_address,
    preflight,
    start,
    supernode_command,
)

from fedslm.certs import make_certificates
from fedslm.cli import main
from fedslm.data import generate_bank_messages, write_rows
from fedslm.keys import generate_key
from fedslm.policy import load_policy


def _issue(ca_dir: Path, out: Path, hosts: list[str], days: int, start_days: int = -1) -> Path:
    """A server certificate for ``hosts`` signed by the CA in ``ca_dir``, valid from
    ``start_days`` to ``start_days + days`` days from now; writes CERT.pem and CERT.key."""
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            import ipaddress

            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=start_days))
        .not_valid_after(now + dt.timedelta(days=start_days + days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    (out.parent).mkdir(parents=True, exist_ok=True)
    out.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out


class TLSServer:
    """A loopback TLS server presenting ``cert``: completes handshakes, then closes."""

    def __init__(self, cert: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert.with_suffix(".pem"), cert.with_suffix(".key"))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5)
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: what some tests want
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    make_certificates(root / "good", ["127.0.0.1", "localhost"])
    make_certificates(root / "other", ["127.0.0.1"])  # another consortium's CA
    _issue(root / "good", root / "expired" / "server", ["127.0.0.1"], days=1, start_days=-3)
    _issue(root / "good", root / "elsewhere" / "server", ["coordinator.example.org"], days=30)
    return root


@pytest.fixture
def server(pki: Path) -> Iterator[TLSServer]:
    s = TLSServer(pki / "good" / "server")
    yield s
    s.close()


def test_preflight_accepts_the_right_ca_and_name(pki: Path, server: TLSServer) -> None:
    described = preflight(f"127.0.0.1:{server.port}", pki / "good" / "ca.crt")
    assert "127.0.0.1" in described and "valid until" in described


def test_preflight_names_a_foreign_ca(pki: Path, server: TLSServer) -> None:
    with pytest.raises(DaemonError, match=r"not signed by the CA in daemon\.ca_cert") as err:
        preflight(f"127.0.0.1:{server.port}", pki / "other" / "ca.crt")
    assert "Get the consortium's CA certificate" in str(err.value)
    assert "issuer CN=fedslm consortium CA" in str(err.value)  # what the server presents


def test_preflight_names_an_expired_certificate(pki: Path) -> None:
    s = TLSServer(pki / "expired" / "server")
    try:
        with pytest.raises(DaemonError, match="has expired") as err:
            preflight(f"127.0.0.1:{s.port}", pki / "good" / "ca.crt")
        assert "renew" in str(err.value)
    finally:
        s.close()


def test_preflight_names_a_host_name_mismatch(pki: Path) -> None:
    s = TLSServer(pki / "elsewhere" / "server")
    try:
        with pytest.raises(DaemonError, match=r"does not name '127\.0\.0\.1'") as err:
            preflight(f"127.0.0.1:{s.port}", pki / "good" / "ca.crt")
        assert "coordinator.example.org" in str(err.value)  # the names it does have
    finally:
        s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_preflight_says_nothing_is_listening(pki: Path) -> None:
    with pytest.raises(DaemonError, match=r"nothing is listening at 127\.0\.0\.1:\d+"):
        preflight(f"127.0.0.1:{_free_port()}", pki / "good" / "ca.crt")


def test_preflight_says_when_the_server_does_not_speak_tls(pki: Path) -> None:
    plain = socket.create_server(("127.0.0.1", 0))
    port = plain.getsockname()[1]

    def answer_http() -> None:
        conn, _ = plain.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer_http, daemon=True)
    t.start()
    try:
        with pytest.raises(DaemonError, match="does not speak TLS"):
            preflight(f"127.0.0.1:{port}", pki / "good" / "ca.crt")
    finally:
        t.join(timeout=5)
        plain.close()


def test_address_and_command() -> None:
    assert parse_address("[::1]:9092") == ("::1", 9092)
    with pytest.raises(Exception, match="is not host:port"):
        parse_address("coordinator.example.org")


# -- the daemon --------------------------------------------------------------------------------


def _site(folder: Path, pki: Path, port: int) -> Path:
    """A site folder with data, key and a policy whose daemon dials 127.0.0.1:port."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = generate_bank_messages(["site-1"], 20, 0, 1.0)
    write_rows([{"text": r["text"], "label": r["label"]} for r in rows], folder / "data.csv")
    generate_key(folder / "site.key", folder / "site.pub", "fedslm-site:site-1")
    policy = {
        "data": "data.csv",
        "daemon": {
            "name": "site-1",
            "coordinator": f"127.0.0.1:{port}",
            "ca_cert": str(pki / "good" / "ca.crt"),
            "key": "site.key",
            "state_dir": "state",
            "runtime_port": 19094,
        },
    }
    (folder / "site.yaml").write_text(yaml.safe_dump(policy))
    return folder / "site.yaml"


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_supernode_command_is_tls_with_the_sites_key(tmp_path: Path, pki: Path) -> None:
    policy = load_policy(_site(tmp_path / "s", pki, 9092))
    settings = policy.daemon
    assert settings is not None
    cmd = supernode_command(settings, Path("/run/x/worker.sock"), Path("/run/x/executor.secret"))
    # Flower's SuperNode through fedslm's launcher, which shortens its polls
    assert cmd[:7] == [sys.executable, "-m", "fedslm.clients.supernode",
                       "--poll-interval", "0.2", "--idle-poll-interval", "3"]  # fmt: skip
    # no SuperExec: fedslm's executor takes the tasks, authenticated with the secret
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == "/run/x/executor.secret"
    assert "--insecure" not in cmd
    assert "--allow-runtime-dependency-installation" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(pki / "good" / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "s" / "site.key")
    assert cmd[cmd.index("--node-config") + 1] == 'worker="/run/x/worker.sock" site="site-1"'
    assert cmd[cmd.index("--port") + 1] == "19094"


def test_a_failed_preflight_starts_nothing(
    tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _site(tmp_path / "s", pki, _free_port())
    assert main(["site", "start", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "error: nothing is listening at 127.0.0.1:" in err
    state = tmp_path / "s" / "state"
    assert not (state / "worker.sock").exists() and not (state / "daemon.pid").exists()
    assert not (state / "supernode.log").exists() and not (state / "site.secret").exists()
    assert "pre-flight failed" in (state / "daemon.log").read_text()


def test_a_policy_without_a_daemon_section_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "site.yaml").write_text("data: data.csv\n")
    assert main(["site", "start", "--policy", str(tmp_path / "site.yaml")]) == 2
    assert "no daemon section" in capsys.readouterr().err


@pytest.mark.deployment
def test_an_unregistered_key_is_explained(tmp_path: Path, pki: Path, server: TLSServer) -> None:
    policy = _site(tmp_path / "s", pki, server.port)
    # what flower-supernode 1.41 does when the coordinator refuses its key: it logs exit code
    # 305 in colour, then its web server shuts down and the process exits with status 1
    fake = _script(
        tmp_path / "supernode",
        "printf '\\033[91mERROR \\033[0m:     Exit Code: 305\\n[code: 2004] Failed to "
        "activate SuperNode.\\n' >&2; echo 'INFO:     Shutting down'; exit 1",
    )
    state = tmp_path / "s" / "state"
    state.mkdir(parents=True)
    (state / "supernode.log").write_text("Exit Code: 302\n")  # an earlier start's: not read
    assert start(policy, supernode=fake) == 1
    log = (state / "daemon.log").read_text()
    assert "exited with code 1 (Flower exit code 305)" in log
    assert "this site's key is not registered" in log
    assert "`fedslm coordinator add-site site-1 site.pub`" in log
    assert "ERROR :     Exit Code: 305" in log and "Failed to activate" in log  # its log's tail
    assert not (state / "worker.sock").exists() and not (state / "daemon.pid").exists()
    assert (state / "site.secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.deployment
def test_sigterm_stops_the_supernode_and_removes_the_socket(
    tmp_path: Path, pki: Path, server: TLSServer
) -> None:
    policy = _site(tmp_path / "s", pki, server.port)
    child_pid = tmp_path / "child.pid"
    fake = _script(tmp_path / "supernode", f'echo $$ > {child_pid}; echo "$@"; exec sleep 60')
    code = (
        "import sys; from pathlib import Path; from fedslm.clients.daemon import start\n"
        f"sys.exit(start(Path({str(policy)!r}), supernode={fake!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    state = tmp_path / "s" / "state"
    try:
        deadline = time.monotonic() + 30
        while not child_pid.exists() or not child_pid.read_text().strip():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the SuperNode was not started"
            time.sleep(0.1)
        sock = state / "worker.sock"
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o660
        assert int((state / "daemon.pid").read_text()) == proc.pid
        executor_log = state / "executor.log"
        while not executor_log.exists() or "executor up" not in executor_log.read_text():
            assert time.monotonic() < deadline, "the executor did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "SIGTERM: stopping the SuperNode" in out
    with pytest.raises(ProcessLookupError):
        os.kill(int(child_pid.read_text()), 0)
    assert not (state / "worker.sock").exists() and not (state / "daemon.pid").exists()
    # the SuperNode got TLS arguments and the worker's socket
    args = (state / "supernode.log").read_text()
    assert f"--root-certificates {pki / 'good' / 'ca.crt'}" in args and "--insecure" not in args
    # the executor ran beside it, and stopped with it; its secret is gone
    assert "ClientApp executor stopped (exit code 0)" in out
    assert "executor stopped" in (state / "executor.log").read_text()
    assert not (state / "executor.secret").exists()


@pytest.mark.deployment
def test_an_executor_that_dies_stops_the_daemon_with_its_reason(tmp_path: Path) -> None:
    from fedslm.deployment.config import DaemonSettings

    settings = DaemonSettings(
        name="bank-a", coordinator="c:1", ca_cert="ca.crt", key="k", state_dir=str(tmp_path)
    )
    child_pid = tmp_path / "child.pid"
    supernode = [_script(tmp_path / "supernode", f"echo $$ > {child_pid}; exec sleep 60")]
    executor = [_script(tmp_path / "executor", "echo 'cannot reach the runtime API' >&2; exit 3")]
    log = DaemonLog(tmp_path / "daemon.log", stream=io.StringIO())
    assert _run(settings, supernode, executor, tmp_path, log) == 1
    text = (tmp_path / "daemon.log").read_text()
    assert "the ClientApp executor exited with code 3" in text
    assert "cannot reach the runtime API" in text  # the tail of its log
    assert "SuperNode stopped" in text
    with pytest.raises(ProcessLookupError):
        os.kill(int(child_pid.read_text()), 0)


@pytest.mark.deployment
def test_a_site_restarted_after_a_crash_retries_until_the_coordinator_lets_it_in(
    tmp_path: Path, pki: Path, server: TLSServer
) -> None:
    """After a crash the coordinator counts the site online for up to 60 s and refuses to
    activate it (Flower exit 305, as for an unregistered key); a site that was connected
    before tries again instead of giving up."""
    policy = _site(tmp_path / "s", pki, server.port)
    state = tmp_path / "s" / "state"
    state.mkdir()
    (state / "supernode.log").write_text("INFO :      SuperNode ID: 42\n")  # an earlier session
    runs = tmp_path / "runs"
    fake = _script(
        tmp_path / "supernode",
        f"echo x >> {runs}\n"
        f'if [ $(wc -l < {runs}) -lt 3 ]; then echo "Exit Code: 305"; exit 1; fi\n'
        'echo "SuperNode ID: 42"; exec sleep 60',
    )
    code = (
        "import sys; from pathlib import Path; import fedslm.clients.daemon as d\n"
        "d.RETRY_EVERY_S = 0.2\n"
        f"sys.exit(d.start(Path({str(policy)!r}), supernode={fake!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not runs.exists() or len(runs.read_text().splitlines()) < 3:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the SuperNode was not started again"
            time.sleep(0.1)
        time.sleep(1)
        assert proc.poll() is None  # connected: still running
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert out.count("refused to activate this site, which was connected before") == 2


def test_exit_explanations() -> None:
    from fedslm.deployment.config import DaemonSettings

    settings = DaemonSettings(
        name="bank-a", coordinator="c:1", ca_cert="ca.crt", key="k", state_dir="s"
    )
    assert "add-site bank-a site.pub" in explain_exit(305 % 256, settings, "")
    assert "code 49 (Flower exit code 305)" in explain_exit(305 % 256, settings, "")
    assert "not a usable EC private key" in explain_exit(302 % 256, settings, "")
    assert "killed by signal 9" in explain_exit(-9, settings, "")
    later = explain_exit(1, settings, "Exit Code: 305", connected_before=True)
    assert "may have been removed" in later and "add-site bank-a site.pub` again" in later
