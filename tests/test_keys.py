"""Site keys: made at the site, the kind Flower's SuperNode authentication uses, signing."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedslm import keys
from fedslm.cli import main


def test_keygen_writes_a_private_key_only_the_site_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["site", "keygen", str(tmp_path / "k"), "--name", "hospital-a"]) == 0
    private, public = tmp_path / "k" / "site.key", tmp_path / "k" / "site.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    line = public.read_text().strip()
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith("fedslm-site:hospital-a")
    # the fingerprint ssh-keygen -l prints: sha256 of the key blob, unpadded base64
    blob = base64.b64decode(line.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert expected in capsys.readouterr().out
    assert keys.fingerprint(keys.load_public_key(line)) == expected
    # a site's identity never changes by accident
    assert main(["site", "keygen", str(tmp_path / "k")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_signatures_verify_only_with_the_right_key_and_content(tmp_path: Path) -> None:
    keys.generate_key(tmp_path / "a.key", tmp_path / "a.pub", "a")
    keys.generate_key(tmp_path / "b.key", tmp_path / "b.pub", "b")
    a = keys.load_private_key(tmp_path / "a.key")
    b_pub = keys.load_public_key((tmp_path / "b.pub").read_text())
    body = {"site": "a", "report_sha256": "00" * 32}
    sig = keys.sign(a, body)
    assert keys.verify(a.public_key(), body, sig)
    assert not keys.verify(b_pub, body, sig)
    assert not keys.verify(a.public_key(), body | {"site": "b"}, sig)
    assert not keys.verify(a.public_key(), body, "not base64!")


def test_other_key_kinds_are_refused(tmp_path: Path) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "p256.key"
    path.write_bytes(
        p256.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(keys.SiteKeyError, match="P-384"):
        keys.load_private_key(path)
    with pytest.raises(keys.SiteKeyError, match="cannot read"):
        keys.load_private_key(tmp_path / "missing.key")
    with pytest.raises(keys.SiteKeyError, match="not an OpenSSH public key"):
        keys.load_public_key("ssh-rsa nonsense")
