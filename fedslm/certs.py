"""TLS certificates for a consortium: a private CA and the coordinator's server certificate.

The coordinator's Flower SuperLink serves TLS with a server certificate signed by a CA that
every site trusts (sites pass the CA certificate as ``--root-certificates``). The server
certificate needs a subject alternative name for every address sites dial, including
``127.0.0.1`` when anything connects over loopback (field notes). Keys are ECDSA P-384 and are
written with mode 0600; nothing is ever overwritten, so a running consortium's CA cannot be
replaced by accident.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedslm.errors import FedSLMError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


# what a CA key may do: sign certificates (and revocation lists), nothing else
_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


class CertError(FedSLMError):
    """A certificate cannot be made or read (bad host name, existing file, unreadable key)."""


@dataclass(frozen=True)
class Issued:
    """The files written by ``make_certificates``."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def make_certificates(
    out: Path, hosts: list[str], *, days: int = 365, name: str = "fedslm consortium"
) -> Issued:
    """A new CA and a server certificate for ``hosts`` (DNS names or IP addresses), valid for
    ``days``. Refuses to overwrite any existing file."""
    if not hosts:
        raise CertError("give at least one host the coordinator is reached at (e.g. 127.0.0.1)")
    if days < 1:
        raise CertError(f"days must be >= 1, got {days}")
    paths = Issued(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    existing = [str(p) for p in vars(paths).values() if p.exists()]
    if existing:
        raise CertError(
            f"{', '.join(existing)} already exist; certificates are never overwritten (use "
            "another folder, or delete them deliberately to rotate)"
        )
    sans = [_san(h) for h in hosts]
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.server_cert, server.public_bytes(serialization.Encoding.PEM))
    return paths


def read_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate, or ``CertError`` naming the file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"{path}: not a readable PEM certificate: {exc}") from None


def describe(cert: x509.Certificate) -> str:
    """Subject, issuer, SANs and expiry, for operators."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return (
        f"subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}, "
        f"valid until {cert.not_valid_after_utc.isoformat(timespec='seconds')}"
        + (f", names {', '.join(names)}" if names else "")
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c in host for c in " /:@") or host.startswith(("-", ".")):
        raise CertError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # O_EXCL: never replace a file another process (or an operator) just made
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
