"""A site's ECDSA key: made at the site, used to sign what the site vouches for.

The same kind of key Flower's SuperNode authentication uses (``ssh-keygen -t ecdsa -b 384``:
NIST P-384, OpenSSH formats), so one key pair can identify a site to the coordinator and sign
its part of a privacy report. The private key never leaves the site; the public key is what the
coordinator operator registers and what an auditor checks signatures against.

Signatures are ECDSA with SHA-384 over canonical JSON (sorted keys, no spaces, UTF-8), encoded
in base64.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedslm.errors import FedSLMError

ALGORITHM = "ecdsa-p384-sha384"


class SiteKeyError(FedSLMError):
    """A key file is missing, unreadable, or not an ECDSA P-384 key."""


def generate_key(private_path: Path, public_path: Path, comment: str) -> str:
    """Write a new P-384 key pair (OpenSSH formats; private key mode 0600); return the public
    key line. Refuses to overwrite an existing key: a site's identity must not change by
    accident."""
    for p in (private_path, public_path):
        if p.exists():
            raise SiteKeyError(
                f"{p}: already exists; a site keeps its key (delete it first to rotate)"
            )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    line = f"{public_text(key.public_key())} {comment}".strip()
    public_path.write_text(line + "\n", encoding="utf-8")
    return line


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an ECDSA P-384 private key (OpenSSH or PEM, unencrypted)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SiteKeyError(f"{path}: cannot read the site's private key: {exc.strerror}") from None
    try:
        key: Any = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError) as exc:
        raise SiteKeyError(f"{path}: not a readable unencrypted private key: {exc}") from None
    return _p384(key, path)


def load_public_key(text: str, source: str = "public key") -> ec.EllipticCurvePublicKey:
    """Parse an OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA… comment``)."""
    try:
        key: Any = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError) as exc:
        raise SiteKeyError(f"{source}: not an OpenSSH public key: {exc}") from None
    return _p384(key, source)


def public_text(key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH public key line, without a comment."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:…`` as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_text(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(key: ec.EllipticCurvePrivateKey, obj: Any) -> str:
    """base64 ECDSA-SHA384 signature of ``canonical_json(obj)``."""
    return base64.b64encode(key.sign(canonical_json(obj), ec.ECDSA(hashes.SHA384()))).decode()


def verify(key: ec.EllipticCurvePublicKey, obj: Any, signature: str) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``canonical_json(obj)``."""
    try:
        key.verify(base64.b64decode(signature), canonical_json(obj), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _p384(key: Any, source: object) -> Any:
    curve = getattr(key, "curve", None)
    if not isinstance(curve, ec.SECP384R1):
        raise SiteKeyError(
            f"{source}: expected an ECDSA P-384 key (ssh-keygen -t ecdsa -b 384), got "
            f"{type(key).__name__}"
        )
    return key
