"""The consortium's CA and the coordinator's server certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509

from fedslm.certs import CertError, make_certificates, read_certificate
from fedslm.cli import main


def test_server_certificate_is_signed_by_the_ca_with_every_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["certs", str(tmp_path), "--host", "127.0.0.1", "--host", "coord.example", "--days", "30"]
    )
    assert code == 0
    ca, server = read_certificate(tmp_path / "ca.crt"), read_certificate(tmp_path / "server.pem")
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["coord.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    days = (server.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    assert 29 <= days <= 30
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    assert "names coord.example, 127.0.0.1" in capsys.readouterr().out


def test_nothing_is_overwritten_and_bad_hosts_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_certificates(tmp_path, ["127.0.0.1"])
    before = (tmp_path / "ca.crt").read_bytes()
    assert main(["certs", str(tmp_path), "--host", "127.0.0.1"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (tmp_path / "ca.crt").read_bytes() == before
    with pytest.raises(CertError, match="neither an IP address nor a DNS name"):
        make_certificates(tmp_path / "x", ["http://coord"])
    with pytest.raises(CertError, match="not a readable PEM certificate"):
        read_certificate(tmp_path / "ca.key")
