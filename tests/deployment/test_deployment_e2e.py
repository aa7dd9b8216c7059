"""A real deployment on loopback: coordinator (SuperLink + TLS + SuperNode auth + proxy) and
three site daemons as separate processes, driven only by the commands an operator runs
(``fedslm.deployment.loopback``).

One module-scoped deployment serves every test (starting it costs most of the time): an
unregistered site is refused; a site is killed mid-round, the run completes without it, and
restarted with the same key it takes part in the next runs; a job runs to the end; the
coordinator is killed mid-run and resumed, ending with the same adapter as the uninterrupted
run and no spend counted twice.
Every process started here is stopped by PID at the end, pass or fail.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedslm.deployment.loopback import LoopbackDeployment, cli, wait_for

NGINX = "/usr/sbin/nginx"
SITES = ("site-a", "site-b", "site-c")

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(
        not Path(NGINX).exists(),
        reason="nginx is not installed (`make test` installs it as root with apt); the deployment "
        "test needs the site-facing proxy",
    ),
]


def _ledger_rounds(ledger: Path, job_id: str) -> list[int]:
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT round FROM entries WHERE job_id = ?", (job_id,)).fetchall()
    return sorted(int(r[0]) for r in rows)


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackDeployment]:
    c = LoopbackDeployment(
        tmp_path_factory.mktemp("deploy"), SITES, spare_sites=("site-x",), nginx=NGINX
    )
    try:
        c.start()
        yield c
    finally:
        alive = c.stop_all()
        assert not alive, f"processes left running: {alive}"


def test_unregistered_site_is_refused(cluster: LoopbackDeployment) -> None:
    proc = cluster.start_site("site-x")
    code = proc.wait(120)
    out = (cluster.site_dir("site-x") / "daemon.out").read_text()
    assert code != 0
    assert "not registered" in out and "add-site" in out, out[-2000:]
    # and on the coordinator's side, in the SuperLink's log
    log = (cluster.root / "coordinator" / "state" / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in log


def test_site_killed_mid_round(cluster: LoopbackDeployment) -> None:
    """The round finishes with the other two sites, the run completes, and the killed site's
    ledger is intact when it comes back (it rejoins for the next test's runs)."""
    job = cluster.write_job("job-kill", round_timeout_s=25)
    run = cluster.run(job, "site-killed")
    log = cluster.site_dir("site-c") / "state" / "daemon.log"
    before = log.read_text() if log.exists() else ""
    wait_for(
        "site-c to start training",
        lambda: log.read_text().count("train: started") > before.count("train: started"),
        200,
    )
    cluster.kill("site-c")
    cluster.wait_finished("site-killed", 300)
    rounds = cluster.rounds_done("site-killed")
    assert [r["round"] for r in rounds] == [1, 2] and all(r["aggregated"] for r in rounds)
    assert all("train_loss" not in r["sites"].get("site-c", {}) for r in rounds)
    assert any("site site-c" in f for f in rounds[0]["failures"]), rounds[0]["failures"]
    cluster.start_site("site-c")  # same key, same identity: the next test needs all three
    # its ledger is intact: round 1 is in it if the kill came after the entry was written
    # (recorded before training: over-counted, never under); killed earlier, there is none
    ledger = cluster.site_dir("site-c") / "ledger.db"
    if ledger.exists():
        verify = cli("ledger", "verify", str(ledger))
        assert ": OK" in verify.stdout, verify.stdout
        job_id = json.loads((run / "job.json").read_text())["job_id"]
        assert set(_ledger_rounds(ledger, job_id)) <= {1}
    assert (run / "privacy.json").exists()


def test_run_and_resume_after_coordinator_crash(cluster: LoopbackDeployment) -> None:
    """Every site takes part (site-c, killed in the test before, is back under its key); the
    coordinator killed mid-run and resumed ends where the uninterrupted run ends."""
    job = cluster.write_job("job")
    a = cluster.run(job, "uninterrupted")
    cluster.wait_finished("uninterrupted", 300)
    rounds = cluster.rounds_done("uninterrupted")
    assert [r["round"] for r in rounds] == [1, 2] and all(r["aggregated"] for r in rounds)
    assert all(set(r["sites"]) >= set(SITES) for r in rounds)

    b = cluster.run(job, "interrupted")
    wait_for("round 1 of the interrupted run", lambda: cluster.rounds_done("interrupted"), 200)
    cluster.kill("coordinator")  # SuperLink, ServerApp and proxy die mid-run
    assert len(cluster.rounds_done("interrupted")) < 2
    cluster.start_coordinator()
    cli("coordinator", "resume", "interrupted", "--config", str(cluster.config))
    cluster.wait_finished("interrupted", 300)

    rounds = cluster.rounds_done("interrupted")
    assert sorted({r["round"] for r in rounds if r["aggregated"]}) == [1, 2]
    want, got = _adapter(a), _adapter(b)
    assert want.keys() == got.keys()
    for k in want:
        assert (want[k] - got[k]).abs().max().item() < 1e-5, k
    # no spend counted twice: each site's epsilon for the resumed job equals the
    # uninterrupted job's, at the coordinator and in the site's own ledger
    pa = json.loads((a / "privacy.json").read_text())["sites"]
    pb = json.loads((b / "privacy.json").read_text())["sites"]
    job_b = json.loads((b / "job.json").read_text())["job_id"]
    for site in SITES:
        assert pb[site]["dp_steps"] == pa[site]["dp_steps"], site
        assert abs(pb[site]["epsilon"] - pa[site]["epsilon"]) < 1e-9, site
        assert _ledger_rounds(cluster.site_dir(site) / "ledger.db", job_b) == [1, 2], site


def test_site_and_federation_reports_of_the_deployed_run(
    cluster: LoopbackDeployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each site reports from its own ledger and signs; the operators hand the reports over;
    the coordinator writes the federation report and the governance summary; verify passes at
    each site and at the coordinator, and fails on a site report edited after signing."""
    from fedslm.cli import main

    name = "uninterrupted"
    run = cluster.run_dir(name)
    if not (run / "privacy.json").exists():  # this test alone: make the run first
        cluster.run(cluster.write_job("job-report"), name)
        cluster.wait_finished(name, 300)
    job_id = json.loads((run / "job.json").read_text())["job_id"]
    config = ["--config", str(cluster.config)]
    for site in SITES:
        policy = str(cluster.site_dir(site) / "site.yaml")
        out = cluster.site_dir(site) / "report-out"
        assert main(["site", "report", "--policy", policy, "--job", job_id,
                     "--out", str(out)]) == 0  # fmt: skip
        assert main(["verify", str(out / "report.json"), "--policy", policy]) == 0
        assert main(["coordinator", "add-report", name, str(out), *config]) == 0
    assert main(["coordinator", "report", name, *config]) == 0
    report = json.loads((run / "report.json").read_text())
    assert [(s["site"], s["signature_verified"], s["agrees"]) for s in report["sites"]] == [
        (s, True, True) for s in SITES
    ]
    registry = str(cluster.root / "coordinator" / "state" / "sites.json")
    assert main(["verify", str(run), "--keys", registry]) == 0
    pub = str(cluster.root / "coordinator" / "state" / "report.pub")
    governance = str(run / "governance" / "report.json")
    assert main(["verify", governance, "--coordinator-key", pub]) == 0
    # a site report edited after signing (on a copy of the run) fails, naming the site
    copy = tmp_path / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    edited = copy / "site-reports" / "site-b" / "report.json"
    edited.write_text(edited.read_text().replace('"remaining": ', '"remaining": 1', 1))
    capsys.readouterr()
    assert main(["verify", str(copy), "--keys", registry]) == 1
    assert "site site-b" in capsys.readouterr().err
