"""``fedslm coordinator``: its service file, its TLS checks, and site registration and job
submission against a real SuperLink (TLS, SuperNode authentication), each bad input refused
with a message naming what to fix."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedslm.certs import make_certificates
from fedslm.deployment.config import CoordinatorSettings, load_coordinator_settings
from fedslm.deployment.coordinator import (
    CoordinatorError,
    add_site,
    check_tls_files,
    read_sites,
    remove_site,
    site_status,
    submit,
)
from fedslm.errors import ConfigError
from fedslm.keys import SiteKeyError, generate_key

pytestmark = pytest.mark.deployment

FEDSLM = str(Path(sys.executable).parent / "fedslm")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_settings(folder: Path, **over: object) -> Path:
    raw = {
        "state_dir": "state",
        "tls": {"ca_cert": "certs/ca.crt", "cert": "certs/server.pem", "key": "certs/server.key"},
        "superlink": {"host": "127.0.0.1", "port": _port()},
        "proxy": {"enabled": False},
        **over,
    }
    path = folder / "coordinator.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_service_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = _write_settings(tmp_path, superlink={"port": 70000})
    with pytest.raises(
        ConfigError, match=r"(?s)coordinator.yaml: invalid coordinator service file.*superlink.port"
    ):
        load_coordinator_settings(path)
    path.write_text(yaml.safe_dump({"state_dir": "s", "tsl": {}}))
    with pytest.raises(ConfigError, match=r"(?s)tls: Field required") as err:
        load_coordinator_settings(path)
    assert "tsl" in str(err.value)  # the misspelt key is named too
    settings = load_coordinator_settings(_write_settings(tmp_path, models={"m": "models/m"}))
    assert Path(settings.tls.cert).is_absolute() and settings.state == tmp_path / "state"
    assert settings.models == {"m": str(tmp_path / "models" / "m")}


def test_tls_files_are_checked_before_anything_starts(tmp_path: Path) -> None:
    settings = load_coordinator_settings(_write_settings(tmp_path))
    with pytest.raises(ConfigError, match=r"(?s)tls.ca_cert: .* does not exist.*fedslm certs"):
        check_tls_files(settings)
    make_certificates(tmp_path / "certs", ["coord.example.org"])
    with pytest.raises(ConfigError, match=r"no 127\.0\.0\.1 subject alternative name"):
        check_tls_files(settings)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorSettings]:
    folder = tmp_path_factory.mktemp("coordinator")
    make_certificates(folder / "certs", ["127.0.0.1", "localhost"])
    config = _write_settings(folder)
    log = (folder / "start.log").open("wb")
    proc = subprocess.Popen(
        [FEDSLM, "coordinator", "start", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while "coordinator up" not in (folder / "start.log").read_text():
            assert proc.poll() is None, (folder / "start.log").read_text()
            assert time.monotonic() < deadline, "the coordinator did not start in 60 s"
            time.sleep(0.3)
        yield load_coordinator_settings(config)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert not (folder / "state" / "coordinator.pid").exists()  # cleaned up on stop


def _key(folder: Path, name: str) -> Path:
    generate_key(folder / f"{name}.key", folder / f"{name}.pub", name)
    return folder / f"{name}.pub"


def test_sites_are_registered_once_and_removed(
    coordinator: CoordinatorSettings, tmp_path: Path
) -> None:
    pub = _key(tmp_path, "a")
    entry = add_site(coordinator, "hospital-a", pub)
    assert isinstance(entry["node_id"], int) and entry["fingerprint"].startswith("SHA256:")
    with pytest.raises(CoordinatorError, match="already registered"):
        add_site(coordinator, "hospital-a", _key(tmp_path, "other"))
    with pytest.raises(CoordinatorError, match="already registered as site 'hospital-a'"):
        add_site(coordinator, "hospital-b", pub)
    with pytest.raises(ConfigError, match="site name"):
        add_site(coordinator, "../etc", _key(tmp_path, "c"))
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-rsa AAAA not-a-key\n")
    with pytest.raises(SiteKeyError, match=r"bad\.pub"):
        add_site(coordinator, "hospital-c", bad)
    status = {s["name"]: s for s in site_status(coordinator)}
    assert status["hospital-a"]["status"] == "registered"  # known, never connected
    remove_site(coordinator, "hospital-a")
    assert "hospital-a" not in read_sites(coordinator)
    assert site_status(coordinator) == []
    with pytest.raises(CoordinatorError, match="no site 'hospital-a'"):
        remove_site(coordinator, "hospital-a")


def _job(tmp_path: Path, **over: object) -> Path:
    raw = {
        "model": {"name": "tiny-bert"},
        "data": {"at_sites": True, "labels": ["a", "b"]},
        "federation": {"sites": ["site-1", "site-2"], "rounds": 1},
        **over,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"data": {"synthetic": {}}}, "set data.at_sites: true"),
        ({"data": {"at_sites": True}}, "data.labels: a deployed classification job"),
        ({"federation": {"sites": 2}}, "federation.sites: name the registered sites"),
        ({}, r"\['site-1', 'site-2'\] are not registered"),
    ],
)
def test_a_job_that_cannot_run_is_refused_before_anything_is_written(
    coordinator: CoordinatorSettings, tmp_path: Path, over: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        submit(coordinator, _job(tmp_path, **over), "refused")
    assert not (coordinator.state / "runs" / "refused").exists()
