"""The coordinator's reverse proxy: nginx in front of Flower's SuperLink.

In Flower 1.41 the SuperLink serves the site API (``/v1/fleet/*``), the admin (Control) API
(``/v1/control/*``, no authentication in open-source Flower: whoever reaches it can start runs,
i.e. run code on the coordinator and on every site) and the runtime API on one HTTPS port. So
the SuperLink listens on the coordinator's private interface only, and nginx, on the public
interface, serves TLS with the coordinator's certificate and forwards the site API, and nothing
else, to it. The configuration is rendered from ``templates/nginx.conf.j2`` into
``STATE/proxy/nginx.conf``; nginx runs in the foreground as a child of
``fedslm coordinator start`` with its pid file, logs and temp files under ``STATE/proxy/``, so
it needs no privilege beyond binding the public port.

Nothing here imports Flower; nginx is started as a program.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from fedslm.deployment.config import CoordinatorSettings
from fedslm.errors import FedSLMError

PROXY_DIR = "proxy"
CONFIG_FILE = "nginx.conf"
PID_FILE = "nginx.pid"
ERROR_LOG = "error.log"
ACCESS_LOG = "access.log"
TEMP_DIR = "tmp"

# How long `nginx -t` may take (it only parses files and loads certificates).
_CHECK_TIMEOUT_S = 30

# nginx reads `$` as a variable and has no escape for `"` or `\` inside a quoted string
_UNSAFE_PATH = re.compile(r'["\\$\x00-\x1f\x7f]')

_DNS_NAME = re.compile(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1", "*": "127.0.0.1"}


class ProxyError(FedSLMError):
    """The proxy cannot be configured or started (nginx missing, bad config, unsafe path)."""


def proxy_dir(settings: CoordinatorSettings) -> Path:
    """``STATE/proxy``: the proxy's config, pid file, logs and temp files."""
    return settings.state.resolve() / PROXY_DIR


def config_path(settings: CoordinatorSettings) -> Path:
    """Where the rendered nginx configuration is written."""
    return proxy_dir(settings) / CONFIG_FILE


def render_proxy_config(settings: CoordinatorSettings, *, upstream_name: str | None = None) -> str:
    """The nginx configuration for ``settings``: TLS on ``proxy.host:proxy.port``, the site API
    forwarded to the SuperLink over verified TLS, 404 for everything else.

    ``upstream_name`` is the name nginx checks the SuperLink's certificate against; by default
    it is found by ``upstream_tls_name`` (which reads ``tls.cert`` when the SuperLink is dialled
    at an IP address).
    """
    base = proxy_dir(settings)
    name = upstream_name if upstream_name is not None else upstream_tls_name(settings)
    if not _DNS_NAME.fullmatch(name):
        raise ProxyError(f"{name!r} is not a name nginx can check a certificate against")
    listen = _host_port(settings.proxy.host, settings.proxy.port)
    if settings.proxy.host == "::":
        # every interface, IPv4 included: nginx listens on IPv6 only by default
        listen += " ipv6only=off"
    values = {
        "listen": listen,
        "upstream": _host_port(_upstream_host(settings), settings.superlink.port),
        "upstream_name": name,
        "pid": _path(base / PID_FILE, "proxy pid file"),
        "error_log": _path(base / ERROR_LOG, "proxy error log"),
        "access_log": _path(base / ACCESS_LOG, "proxy access log"),
        "temp": _path(base / TEMP_DIR, "proxy temp folder"),
        "cert": _path(Path(settings.tls.cert).resolve(), "tls.cert"),
        "key": _path(Path(settings.tls.key).resolve(), "tls.key"),
        "ca_cert": _path(Path(settings.tls.ca_cert).resolve(), "tls.ca_cert"),
    }
    return _environment().get_template("nginx.conf.j2").render(**values)


def upstream_tls_name(settings: CoordinatorSettings) -> str:
    """The name nginx checks the SuperLink's certificate against (``proxy_ssl_name``).

    nginx matches it with OpenSSL's ``X509_check_host``: against the certificate's DNS names,
    or its common name when it has none, never against its IP addresses. So a SuperLink dialled
    at a DNS name is checked against that name; one dialled at an IP address (127.0.0.1, the
    default) against the first DNS name of ``tls.cert`` (the certificate the SuperLink serves),
    else its common name (``fedslm certs`` sets it to the first ``--host``). Either way nginx
    also requires the certificate to chain to ``tls.ca_cert``.
    """
    host = _upstream_host(settings)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fedslm.certs import read_certificate

    try:
        cert = read_certificate(Path(settings.tls.cert))
    except FedSLMError as exc:
        raise ProxyError(f"tls.cert: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if dns:
        return str(dns[0])
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common:
        return str(common[0].value)
    raise ProxyError(
        f"tls.cert: {settings.tls.cert} has neither a DNS name nor a common name for the proxy "
        "to check when it connects to the SuperLink; make it with `fedslm certs` and a --host "
        "name"
    )


def write_proxy_config(settings: CoordinatorSettings) -> Path:
    """Render the configuration into ``STATE/proxy/nginx.conf`` (replacing the previous one)
    and create the folders nginx writes to. Returns the file's path."""
    base = proxy_dir(settings)
    text = render_proxy_config(settings)
    # nginx makes the temp subfolders itself, mode 0700, owned by its worker user
    (base / TEMP_DIR).mkdir(parents=True, exist_ok=True)
    path = base / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    # atomic: a half-written config is never what nginx (or an operator) reads
    tmp.replace(path)
    return path


def proxy_command(settings: CoordinatorSettings) -> list[str]:
    """The command that runs nginx in the foreground with the rendered configuration.

    ``daemon off;`` is in the file itself. ``-e`` sends the errors nginx logs before it has
    read the file (e.g. a missing certificate) to ``STATE/proxy/error.log`` instead of the
    compiled-in ``/var/log/nginx/error.log``, which an unprivileged user cannot open; it exists
    since nginx 1.19.5 and is left out for older versions.
    """
    base = proxy_dir(settings)
    nginx = nginx_program(settings)
    command = [nginx, "-c", str(base / CONFIG_FILE), "-p", f"{base}/"]
    if _supports_error_log_flag(nginx):
        command += ["-e", str(base / ERROR_LOG)]
    return command


def nginx_program(settings: CoordinatorSettings) -> str:
    """``proxy.nginx`` as an executable path, or ``ProxyError`` saying how to install it."""
    program = settings.proxy.nginx
    found = shutil.which(program)
    if found is None:
        raise ProxyError(
            f"proxy.nginx: {program!r} is not an executable program. Install nginx (Debian/"
            "Ubuntu: `apt-get install nginx-light`) or set proxy.nginx in the coordinator's "
            "config to its path"
        )
    return found


def check_proxy_config(settings: CoordinatorSettings) -> None:
    """Run ``nginx -t`` on the written configuration; ``ProxyError`` with nginx's own message
    (bad certificate path, port syntax, unreadable key) if it is refused."""
    command = [*proxy_command(settings), "-t", "-q"]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_CHECK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProxyError(f"`{' '.join(command)}` did not finish in {_CHECK_TIMEOUT_S} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise ProxyError(
            f"nginx refused the proxy configuration {config_path(settings)}:\n{detail}"
        )


def start_proxy(settings: CoordinatorSettings, **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """Write and check the configuration, then start nginx in the foreground and return the
    process (the caller stops it: SIGTERM for a fast stop, SIGQUIT to let requests finish)."""
    if not settings.proxy.enabled:
        raise ProxyError("proxy.enabled is false: there is no proxy to start")
    write_proxy_config(settings)
    check_proxy_config(settings)
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(proxy_command(settings), **popen_kwargs)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fedslm.deployment", "templates"),
        autoescape=False,  # an nginx file, not HTML; every value is checked by _path/_host_port
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _path(path: Path, what: str) -> str:
    text = str(path)
    if _UNSAFE_PATH.search(text):
        raise ProxyError(
            f"{what}: {text!r} contains a character nginx cannot take in a path "
            '(", \\, $ or a control character); use another path'
        )
    return text


def _upstream_host(settings: CoordinatorSettings) -> str:
    # a SuperLink listening on every interface is dialled on loopback
    return _WILDCARD_HOSTS.get(settings.superlink.host, settings.superlink.host)


def _host_port(host: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _DNS_NAME.fullmatch(host):
            raise ProxyError(f"{host!r} is neither an IP address nor a host name") from None
        return f"{host}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@lru_cache(maxsize=8)
def _supports_error_log_flag(nginx: str) -> bool:
    try:
        done = subprocess.run(
            [nginx, "-v"], capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", done.stderr + done.stdout)
    return match is not None and tuple(int(g) for g in match.groups()) >= (1, 19, 5)
