"""The coordinator's reverse proxy: only the site API gets through to the SuperLink.

The end-to-end tests start a real ``flower-superlink`` (TLS, SuperNode authentication, SQLite
state, private loopback port) and nginx from ``fedslm.deployment.proxy`` in front of it, and
check from the outside what a site (or an attacker) can reach. They need nginx
(``make test`` installs Debian's ``nginx-light`` when it runs as root with apt) and skip without
it. Every process is stopped by PID at the end, pass or fail.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedslm.certs import make_certificates
from fedslm.deployment import proxy
from fedslm.deployment.config import CoordinatorSettings

pytestmark = pytest.mark.deployment

NGINX = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="the proxy tests run nginx: install it (`make nginx` as root, or apt-get install "
    "nginx-light)",
)
VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 15
PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


# ---------------------------------------------------------------------------------------------
# rendering (no nginx needed)


def _settings(tmp_path: Path, **over: object) -> CoordinatorSettings:
    raw: dict[str, object] = {
        "state_dir": str(tmp_path / "state"),
        "tls": {
            "ca_cert": str(tmp_path / "certs" / "ca.crt"),
            "cert": str(tmp_path / "certs" / "server.pem"),
            "key": str(tmp_path / "certs" / "server.key"),
        },
    }
    raw.update(over)
    return CoordinatorSettings.model_validate(raw)


def test_rendered_config_forwards_only_the_site_api(tmp_path: Path) -> None:
    make_certificates(tmp_path / "certs", ["coord.example", "127.0.0.1"])
    text = proxy.render_proxy_config(_settings(tmp_path))
    state = (tmp_path / "state" / "proxy").resolve()
    assert "listen 0.0.0.0:9092 ssl default_server;" in text
    assert "server 127.0.0.1:9093;" in text
    # nginx cannot match an IP address in a certificate: it checks a DNS name of server.pem
    assert "proxy_ssl_name coord.example;" in text
    assert "proxy_ssl_verify on;" in text
    assert "daemon off;" in text
    for name in ("nginx.pid", "error.log", "access.log", "tmp/client_body", "tmp/proxy"):
        assert f'"{state}/{name}' in text
    assert text.count("proxy_pass") == 1
    assert "location ~ ^/v1/fleet/[a-z][a-z-]*$" in text


def test_upstream_name_and_addresses(tmp_path: Path) -> None:
    make_certificates(tmp_path / "certs", ["127.0.0.1", "10.0.0.5"])
    # no DNS name in the certificate: nginx falls back to the common name (the first --host)
    assert proxy.upstream_tls_name(_settings(tmp_path)) == "127.0.0.1"
    wild = _settings(
        tmp_path,
        superlink={"host": "0.0.0.0", "port": 7000},
        proxy={"host": "::", "port": 443},
    )
    text = proxy.render_proxy_config(wild)
    assert "server 127.0.0.1:7000;" in text and "listen [::]:443 ipv6only=off ssl" in text
    named = _settings(tmp_path, superlink={"host": "superlink.internal", "port": 7000})
    assert proxy.upstream_tls_name(named) == "superlink.internal"


def test_unusable_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(proxy.ProxyError, match=r"tls\.cert"):
        proxy.render_proxy_config(_settings(tmp_path))  # no certificate yet
    make_certificates(tmp_path / "certs", ["127.0.0.1"])
    bad = _settings(tmp_path, state_dir=str(tmp_path / "st$ate"))
    with pytest.raises(proxy.ProxyError, match="proxy pid file"):
        proxy.render_proxy_config(bad)
    missing = _settings(tmp_path, proxy={"nginx": str(tmp_path / "no-nginx")})
    with pytest.raises(proxy.ProxyError, match="apt-get install nginx-light"):
        proxy.proxy_command(missing)


@needs_nginx
def test_nginx_refusal_is_reported(tmp_path: Path) -> None:
    make_certificates(tmp_path / "certs", ["127.0.0.1"])
    settings = _settings(tmp_path, proxy={"nginx": NGINX, "port": _free_port()})
    path = proxy.write_proxy_config(settings)
    assert path == tmp_path.resolve() / "state" / "proxy" / "nginx.conf"
    proxy.check_proxy_config(settings)  # the written file is accepted as it is
    (tmp_path / "certs" / "server.key").unlink()
    with pytest.raises(proxy.ProxyError, match=r"nginx refused (.|\n)*server\.key"):
        proxy.start_proxy(settings)


# ---------------------------------------------------------------------------------------------
# a real SuperLink behind a real nginx


@dataclass
class Stack:
    settings: CoordinatorSettings
    ca: Path
    public: int  # the proxy's port: what sites reach
    private: int  # the SuperLink's port: loopback only


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("proxy")
    make_certificates(tmp / "certs", ["localhost", "127.0.0.1"])
    private, public = _free_port(), _free_port()
    settings = _settings(
        tmp,
        superlink={"host": "127.0.0.1", "port": private},
        proxy={"host": "127.0.0.1", "port": public, "nginx": NGINX},
    )
    env = {
        **os.environ,
        # the SuperLink starts `flower-superexec` by name
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    superlink = [
        str(VENV_BIN / "flower-superlink"),
        "--ssl-ca-certfile", settings.tls.ca_cert,
        "--ssl-certfile", settings.tls.cert,
        "--ssl-keyfile", settings.tls.key,
        "--enable-supernode-auth",
        "--database", str(tmp / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(private),
    ]  # fmt: skip
    started: list[subprocess.Popen[bytes]] = []
    link_log = tmp / "superlink.log"
    try:
        with link_log.open("wb") as log:
            started.append(
                subprocess.Popen(
                    superlink,
                    cwd=tmp,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        with (tmp / "nginx.out").open("wb") as out:
            started.append(proxy.start_proxy(settings, stdout=out, stderr=subprocess.STDOUT))
        ca = Path(settings.tls.ca_cert)
        _wait_until_serving(private, ca, started[0], link_log)
        _wait_until_serving(public, ca, started[1], proxy.proxy_dir(settings) / "error.log")
        yield Stack(settings, ca, public, private)
    finally:
        _stop_all(started)


def test_admin_api_is_blocked_by_the_proxy_only(stack: Stack) -> None:
    """The Control API answers anyone on the private port; through the proxy, nginx says 404."""
    direct = _post(stack.private, stack.ca, "/v1/control/list-runs")
    assert direct.status == 200, direct  # unauthenticated: this is why it must stay private
    assert direct.headers.get("content-type") == "application/protobuf"
    for path in (
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/",
        "/docs",
        "/v1/runtime/ping",
        "/v1/fleet/",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet/..%2fcontrol/list-runs",
    ):
        reply = _post(stack.public, stack.ca, path)
        assert reply.status == 404 and _from_nginx(reply), (path, reply)
    # blocked requests are what the access log is for
    logged = _logged(stack, "/v1/control/start-run")
    assert len(logged) == 1 and '" 404 ' in logged[0], logged


def test_site_api_reaches_flower(stack: Stack) -> None:
    """A fleet request through the proxy gets Flower's own answer (here: no credentials)."""
    for port in (stack.public, stack.private):
        reply = _post(port, stack.ca, "/v1/fleet/pull-messages")
        assert reply.status == 401, reply
        assert reply.body == b'{"detail":"Invalid SuperNode authentication"}'
    # the fleet API is POST only; anything else stops at nginx
    get = _request(stack.public, stack.ca, "GET", "/v1/fleet/pull-messages")
    assert get.status == 403 and _from_nginx(get)


def test_site_authentication_headers_pass_through(stack: Stack) -> None:
    """A registered site key activates through the proxy with Flower's own client (signed
    headers intact); an unregistered key is refused by Flower, not by nginx."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.control_pb2 import RegisterNodeRequest, RegisterNodeResponse
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    from httpx import HTTPStatusError

    def client(key: ec.EllipticCurvePrivateKey) -> FleetHttpClient:
        return FleetHttpClient.from_server_address(
            f"127.0.0.1:{stack.public}",
            insecure=False,
            root_certificates=stack.ca.read_bytes(),
            interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],
        )

    site = ec.generate_private_key(ec.SECP384R1())
    pem = public_key_to_bytes(site.public_key())
    # the admin registers the key on the private port (what `fedslm coordinator add-site` does)
    reply = _post(
        stack.private,
        stack.ca,
        "/v1/control/register-node",
        RegisterNodeRequest(public_key=pem, name="site-a").SerializeToString(),
    )
    assert reply.status == 200, reply
    node_id = RegisterNodeResponse.FromString(reply.body).node_id
    activated = client(site).ActivateNode(
        ActivateNodeRequest(public_key=pem, heartbeat_interval=30)
    )
    assert activated.node_id == node_id

    stranger = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(HTTPStatusError) as refused:
        client(stranger).ActivateNode(
            ActivateNodeRequest(
                public_key=public_key_to_bytes(stranger.public_key()), heartbeat_interval=30
            )
        )
    assert refused.value.response.status_code == 412
    assert refused.value.response.headers.get("content-type") != "text/html"
    # the access log keeps the refusal, not the successful call
    logged = _logged(stack, "/v1/fleet/activate-node")
    assert len(logged) == 1 and '" 412 ' in logged[0], logged


def test_a_chunk_sized_body_reaches_flower(stack: Stack) -> None:
    """Arrays travel in 5 MiB chunks: a 6 MiB push is Flower's to judge, not a 413 from nginx."""
    reply = _post(stack.public, stack.ca, "/v1/fleet/push-object", b"\0" * (6 << 20))
    assert reply.status == 400 and b"Invalid protobuf payload" in reply.body, reply


def test_plain_http_is_refused(stack: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.public, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/fleet/pull-messages", body=b"", headers=PROTOBUF)
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    assert reply.status == 400
    assert b"The plain HTTP request was sent to HTTPS port" in body
    # and the coordinator's operator sees it too
    _wait_for_line(stack, "client sent plain HTTP request to HTTPS port")


def test_a_client_with_another_ca_fails_verification(stack: Stack, tmp_path: Path) -> None:
    other = make_certificates(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _post(stack.public, other.ca_cert, "/v1/fleet/pull-messages")
    # the site's refusal reaches the coordinator as a TLS alert, logged with the site's address
    line = _wait_for_line(stack, "SSL_do_handshake() failed")
    assert "alert" in line and "client: 127.0.0.1" in line


def _wait_for_line(stack: Stack, text: str, timeout: float = 5.0) -> str:
    """The proxy error log's line holding ``text`` (nginx writes it just after the event)."""
    log = proxy.proxy_dir(stack.settings) / "error.log"
    deadline = time.monotonic() + timeout
    while True:
        found = [x for x in log.read_text().splitlines() if text in x]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers.get('server')!r}, {self.body[:200]!r})"


def _request(port: int, ca: Path, method: str, path: str, body: bytes = b"") -> Reply:
    # http.client sends the path exactly as given (no dot-segment normalisation), like an
    # attacker's hand-made request would
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=context, timeout=REQUEST_TIMEOUT_S
    )
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=PROTOBUF)
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def _post(port: int, ca: Path, path: str, body: bytes = b"") -> Reply:
    return _request(port, ca, "POST", path, body)


def _logged(stack: Stack, path: str) -> list[str]:
    """The access log's lines for ``path``, once there is one (nginx writes a request's line
    after its response has gone out)."""
    log = proxy.proxy_dir(stack.settings) / "access.log"
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in log.read_text().splitlines() if f" {path} " in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _from_nginx(reply: Reply) -> bool:
    # nginx's own error pages; Flower (FastAPI) answers JSON with server "uvicorn"
    return reply.body.startswith(b"<html>") and b"<center>nginx</center>" in reply.body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_serving(port: int, ca: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until a TLS handshake on ``port`` succeeds; fail with the process's log otherwise."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{_tail(log)}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"nothing served TLS on port {port} within {STARTUP_TIMEOUT_S} s:\n{_tail(log)}")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return f"({path} not written)"


def _children(pid: int) -> list[tuple[int, str]]:
    """(PID, start time) of the processes whose parent is ``pid`` (nginx workers; the
    SuperLink's SuperExec); the start time tells a reused PID apart."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[1]) == pid:
                found.append((int(entry.name), fields[19]))
    return found


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..., start time at index 19."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _alive(pid: int, started_at: str) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[19] == started_at and fields[0] != "Z"


def _stop_all(started: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process we started (remembering its children first), wait, SIGKILL what
    is left, children included; bounded in time."""
    children = [c for p in started if p.poll() is None for c in _children(p.pid)]
    for p in started:
        if p.poll() is None:
            p.terminate()
    for p in started:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
    deadline = time.monotonic() + 10
    for pid, started_at in children:
        while _alive(pid, started_at) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, started_at):
            os.kill(pid, signal.SIGKILL)
