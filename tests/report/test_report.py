"""``fedslm report`` and ``fedslm verify`` on real runs: a DP run, a central-DP run, baselines.

One small simulated run is built per module and never modified; every test that tampers with
a run works on its own copy. Chromium tests render the HTML headless, offline, and skip when
/usr/bin/chromium is not installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fedslm.cli import main
from fedslm.report import json_schema
from fedslm.report.model import Report
from fedslm.report_cli import report_cmd, verify_cmd

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
SITES = ("site-1", "site-2", "site-3")
CHROMIUM = Path("/usr/bin/chromium")
SMALL = ["--set", "data.synthetic.rows_per_site=200", "-q"]


def simulate(out: Path, *overrides: str) -> Path:
    # each run its own privacy budget (the runs here reuse one data set, whose ledger would
    # otherwise compose across them)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSLM_LEDGERS", str(out.parent / f"{out.name}-ledgers"))
        assert main(["simulate", str(SMOKE), "--out", str(out), *SMALL, *overrides]) == 0
    return out


def report(run: Path, out: Path | None = None, baselines: tuple[Path, ...] = ()) -> int:
    return report_cmd(argparse.Namespace(run=run, out=out, baseline=list(baselines)))


def verify(path: Path, keys: list[Path] | None = None, allow_unsigned: bool = False) -> int:
    """``fedslm verify``; ``keys`` defaults to the sites' public keys of the run holding
    ``path`` (the simulation's operator holds every site's key)."""
    if keys is None:
        root = next((p for p in [path, *path.parents] if (p / "privacy.json").is_file()), None)
        keys = [root / "sites"] if root is not None else []
    return verify_cmd(argparse.Namespace(path=path, keys=keys, allow_unsigned=allow_unsigned))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """A 2-round DP run with its reports written. Read-only for the tests."""
    out = simulate(tmp_path_factory.mktemp("report") / "run", "--set", "federation.rounds=2")
    assert report(out) == 0
    return out


@pytest.fixture(scope="module")
def central_run(tmp_path_factory: pytest.TempPathFactory, run: Path) -> Path:
    """A 1-round run with central (site-level) DP, reported against ``run`` as a baseline."""
    out = simulate(
        tmp_path_factory.mktemp("report-central") / "run",
        "--set",
        "federation.rounds=1",
        "--set",
        "privacy.central={enabled: true, clip_norm: 1.0, noise_multiplier: 2.0}",
    )
    assert report(out, baselines=(run,)) == 0
    return out


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    """A private copy of the reported run, to tamper with: its files, and its sites' ledgers
    (kept outside the run, one per data set) copied to ``sites/SITE/ledger.db``, with job.json
    and the reports made again to match."""
    out = Path(shutil.copytree(run, tmp_path / "run"))
    manifest = load(out / "job.json")
    for site in manifest["sites"]:
        own = out / "sites" / site["name"] / "ledger.db"
        shutil.copy(site["ledger"], own)
        site["ledger"] = str(own)
    dump(out / "job.json", manifest)
    assert report(out) == 0
    return out


def report_files(run: Path) -> list[Path]:
    return [run / "report.json", *(run / "sites" / s / "report.json" for s in SITES)]


# --------------------------------------------------------------------------------------------
# Report contents


def test_report_files_for_the_federation_and_each_site(run: Path) -> None:
    for path in report_files(run):
        assert path.is_file() and path.with_name("report.html").is_file()
    fed = Report.model_validate_json((run / "report.json").read_text())
    assert fed.scope.level == "federation" and fed.summary.checks_passed
    assert [s.site for s in fed.privacy.sites] == list(SITES)
    assert all(c.passed for c in fed.checks) and len(fed.checks) >= 9
    assert fed.privacy.central is None
    # egress: tensor names and shapes from the adapter; bytes per round per site
    assert fed.egress.tensors and all(t.bytes > 0 for t in fed.egress.tensors)
    assert [r.round for r in fed.egress.rounds] == [1, 2]
    assert fed.egress.per_message_log  # every message, from the site ledgers
    for d in fed.fingerprints.datasets:
        assert d.matches_ledger and d.train_rows == 160 and d.columns == ["label", "text"]
    assert fed.fingerprints.job_config_sha256 == fed.fingerprints.job_config_sha256_recomputed


def test_report_json_validates_against_its_schema(run: Path) -> None:
    schema = json_schema()
    for path in report_files(run):
        data = load(path)
        jsonschema.validate(data, schema)
        assert data["schema_version"] == 1


def test_every_epsilon_names_its_accountant(run: Path) -> None:
    def walk(node: Any, where: str) -> int:
        found = 0
        if where.endswith(".fields") and "per_message_log" in where:
            # a message exactly as a site sent it: its epsilon travelled with its accountant
            assert "epsilon" not in node or node.get("accountant") in ("prv", "pld", "rdp")
            return 0
        if isinstance(node, dict):
            if "epsilon" in node and not isinstance(node["epsilon"], dict):
                assert node.get("accountant") in ("prv", "pld", "rdp", "analytic"), where
                assert isinstance(node.get("delta"), float) and node.get("source"), where
                found += 1
            for key, value in node.items():
                bare = key != "epsilon" and "epsilon" in key and isinstance(value, int | float)
                if bare and "policy" not in where:
                    pytest.fail(f"bare epsilon {where}.{key} = {value}")
                found += walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            found += sum(walk(v, f"{where}[{i}]") for i, v in enumerate(node))
        return found

    for path in report_files(run):
        assert walk(load(path), path.name) >= 5


def test_site_report_is_restricted_to_its_site(run: Path) -> None:
    r = Report.model_validate_json((run / "sites" / "site-2" / "report.json").read_text())
    assert r.scope.site == "site-2"
    assert [s.site for s in r.privacy.sites] == ["site-2"]
    assert [d.site for d in r.fingerprints.datasets] == ["site-2"]
    assert [p.site for p in r.policies] == ["site-2"]
    assert all(set(b.sites) == {"site-2"} for b in r.egress.rounds)
    assert all(set(u.sites) <= {"site-2"} for u in r.utility.rounds)
    assert all("site-2" in g for g in r.summary.guarantees)


# --------------------------------------------------------------------------------------------
# verify


def test_verify_passes_on_the_untouched_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify(run) == 0
    out = capsys.readouterr().out
    assert "verify OK" in out and "4 report(s) match the run" in out
    assert verify(run / "sites" / "site-3" / "report.json") == 0


def test_a_run_written_before_the_server_optimizer_rename_reports_and_verifies(
    copy: Path,
) -> None:
    """job.json of an earlier fedslm holds the old spelling (server_optimizer 'fedavg' with
    proximal_mu, no train.proximal_mu): it still validates, its config hashes to privacy.json's
    job_fingerprint, and report and verify pass."""
    manifest = load(copy / "job.json")
    config = manifest["config"]
    assert config["federation"]["server_optimizer"]["name"] == "sgd"
    config["federation"]["server_optimizer"] |= {"name": "fedavg", "proximal_mu": None}
    del config["train"]["proximal_mu"]
    dump(copy / "job.json", manifest)
    assert report(copy) == 0
    assert verify(copy) == 0
    fed = load(copy / "report.json")["fingerprints"]
    assert fed["job_config_sha256"] == fed["job_config_sha256_recomputed"]


def test_verify_fails_on_an_edited_epsilon_in_report_json(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load(copy / "report.json")
    data["privacy"]["sites"][0]["epsilon"]["epsilon"] = 1.5
    dump(copy / "report.json", data)
    assert verify(copy) == 1
    err = capsys.readouterr().err
    assert "report.json" in err and "privacy.sites[site-1].epsilon.epsilon" in err
    assert "stored 1.5, recomputed 7.9" in err


def test_verify_fails_on_an_edited_number_in_privacy_json(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load(copy / "privacy.json")
    data["sites"]["site-2"]["epsilon"] = 3.0
    dump(copy / "privacy.json", data)
    assert verify(copy) == 1
    err = capsys.readouterr().err
    assert "(site-epsilon): privacy.json, site site-2: field sites.site-2.epsilon" in err
    assert "stored 3.0, recomputed 7.9" in err


def test_verify_fails_on_a_deleted_ledger_entry(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = copy / "sites" / "site-3" / "ledger.db"
    conn = sqlite3.connect(ledger)
    with conn:
        conn.execute("DELETE FROM entries WHERE seq = 2")
    conn.close()
    assert verify(copy) == 1
    err = capsys.readouterr().err
    assert "(ledger-chain): sites/site-3/ledger.db, site site-3: field ledger entries" in err


def test_verify_fails_on_a_swapped_site_report(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(copy / "sites" / "site-1" / "report.json", copy / "sites" / "site-2")
    assert verify(copy) == 1
    err = capsys.readouterr().err
    assert "sites/site-2/report.json, site site-2: field scope.site: stored 'site-1'" in err
    assert verify(copy / "sites" / "site-2" / "report.json") == 1


def test_each_site_signs_its_report_with_its_registered_key(run: Path) -> None:
    from fedslm import keys

    manifest = load(run / "job.json")
    for entry in manifest["sites"]:
        sig = load(run / "sites" / entry["name"] / "report.sig")
        registered = keys.load_public_key(entry["public_key"])
        assert sig["key_fingerprint"] == keys.fingerprint(registered)
        assert sig["algorithm"] == "ecdsa-p384-sha384"
    fed = load(run / "report.json")
    assert set(fed["fingerprints"]["site_keys"]) == {s["name"] for s in manifest["sites"]}


def test_verify_fails_on_a_signature_from_another_site(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(copy / "sites" / "site-1" / "report.sig", copy / "sites" / "site-2")
    assert verify(copy) == 1
    err = capsys.readouterr().err
    assert "sites/site-2/report.sig, site site-2: field signature" in err
    assert "with the site's key from" in err


def test_verify_fails_on_a_missing_signature(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (copy / "sites" / "site-3" / "report.sig").unlink()
    assert verify(copy) == 1
    assert "the site's report is not signed" in capsys.readouterr().err


def test_verify_says_which_keys_it_checked_against(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedslm import keys

    assert verify(run) == 0
    out = capsys.readouterr().out
    for site in SITES:
        pub = keys.load_public_key((run / "sites" / site / "site.pub").read_text())
        assert f"{site} {keys.fingerprint(pub)} ({run / 'sites' / site / 'site.pub'})" in out
    assert f"signatures of {', '.join(SITES)} checked against your keys" in out


def test_a_replaced_site_key_and_a_re_signed_report_fail_against_the_auditors_keys(
    run: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attack: swap a site's key pair in the run and in job.json, then report again. The
    run's own keys now agree with it; the keys the auditor holds do not."""
    from fedslm.keys import generate_key

    folder = copy / "sites" / "site-2"
    (folder / "site.key").unlink()
    (folder / "site.pub").unlink()
    forged = generate_key(folder / "site.key", folder / "site.pub", "fedslm-site:site-2")
    manifest = load(copy / "job.json")
    next(s for s in manifest["sites"] if s["name"] == "site-2")["public_key"] = forged
    dump(copy / "job.json", manifest)
    assert report(copy) == 0
    assert verify(copy, keys=[run / "sites"]) == 1
    err = capsys.readouterr().err
    assert "sites/site-2/report.sig, site site-2: field signature" in err
    assert f"with the site's key from {run / 'sites' / 'site-2' / 'site.pub'}" in err
    assert verify(copy / "sites" / "site-2" / "report.json", keys=[run / "sites"]) == 1


def test_blanked_keys_and_no_signatures_are_unsigned_never_ok(
    run: Path, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attack: blank every key in job.json, drop the sites' keys, report again (nothing
    is signed). Without keys that is UNSIGNED (exit 3); with the auditor's keys, FAILED."""
    manifest = load(copy / "job.json")
    for site in manifest["sites"]:
        site["public_key"] = ""
        (copy / "sites" / site["name"] / "site.key").unlink()
    dump(copy / "job.json", manifest)
    for sig in copy.glob("sites/*/report.sig"):
        sig.unlink()
    assert report(copy) == 0
    assert not list(copy.glob("sites/*/report.sig"))
    assert verify(copy, keys=[]) == 3
    captured = capsys.readouterr()
    assert "keys: none given" in captured.out
    assert "verify UNSIGNED" in captured.err and "verify OK" not in captured.err
    assert "no signature was checked for site-1, site-2, site-3" in captured.err
    assert verify(copy / "report.json", keys=[]) == 3
    assert verify(copy, keys=[run / "sites"]) == 1
    assert "the site's report is not signed" in capsys.readouterr().err
    # only the auditor can decide an unsigned report is acceptable, and it still says so
    assert verify(copy, keys=[], allow_unsigned=True) == 0
    assert "verify OK (UNSIGNED, accepted with --allow-unsigned)" in capsys.readouterr().out


def test_a_site_the_auditor_has_no_key_for_is_unsigned(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(run, keys=[run / "sites" / "site-1" / "site.pub"]) == 3
    err = capsys.readouterr().err
    assert "site-2: you gave no key for this site (--keys)" in err
    assert verify(run / "sites" / "site-1" / "report.json", keys=[run / "sites" / "site-1"]) == 0


def test_verify_reads_keys_from_a_registry_pub_files_and_refuses_bad_ones(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pubs = {s: (run / "sites" / s / "site.pub").read_text().strip() for s in SITES}
    registry = tmp_path / "state" / "sites.json"
    registry.parent.mkdir()
    dump(registry, {s: {"public_key": line, "fingerprint": "x"} for s, line in pubs.items()})
    assert verify(run, keys=[registry]) == 0
    flat = tmp_path / "flat"
    flat.mkdir()
    for s, line in pubs.items():  # a key line without the site's name: named by the file
        (flat / f"{s}.pub").write_text(" ".join(line.split()[:2]) + "\n")
    assert verify(run, keys=[flat]) == 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert verify(run, keys=[tmp_path / "empty"]) == 2
    assert "no site public key in this folder" in capsys.readouterr().err
    (flat / "site-1.pub").write_text(pubs["site-2"].split(" fedslm")[0] + "\n")
    assert verify(run, keys=[flat, run / "sites"]) == 2
    assert "a second, different key for site 'site-1'" in capsys.readouterr().err


def test_the_egress_log_is_in_the_report(run: Path) -> None:
    data = load(run / "report.json")
    log = data["egress"]["per_message_log"]
    trains = [m for m in log if m["kind"] == "train"]
    assert {m["site"] for m in trains} == {"site-1", "site-2", "site-3"}
    assert all(m["status"] == "sent" and len(m["sha256"]) == 64 for m in log)
    names = {t["name"] for t in data["egress"]["tensors"]}
    for m in trains:
        assert {t["name"] for t in m["tensors"]} == names
        assert all(len(t["sha256"]) == 64 for t in m["tensors"])
    assert any(m["kind"] == "evaluate" and "eval-accuracy" in m["metrics"] for m in log)


def test_verify_fails_on_an_edited_html_page(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = copy / "report.html"
    # the first epsilon shown with its accountant, changed by one digit
    edited = re.sub(
        r'(\d)(\.\d+ <span class="acc">)',
        lambda m: f"{(int(m[1]) + 1) % 10}{m[2]}",
        page.read_text(),
        count=1,
    )
    page.write_text(edited)
    assert verify(copy) == 1
    assert "report.html: field content (sha256)" in capsys.readouterr().err


def test_a_registered_check_runs_in_verify(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedslm.report import checks

    monkeypatch.setattr(checks, "CHECKS", list(checks.CHECKS))

    def unsigned(ctx: Any, sites: Any) -> checks.Discrepancy:
        return checks.Discrepancy("sites/site-1/signatures", "site-1", "signature", None, "ECDSA")

    checks.register_check(checks.Check("site-signature", "each site signed", unsigned))
    assert verify(run) == 1
    err = capsys.readouterr().err
    assert "(site-signature): sites/site-1/signatures, site site-1: field signature" in err


def test_verify_unreadable_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(tmp_path / "nothing-here") == 2
    bad = tmp_path / "report.json"
    bad.write_text('{"schema_version": 1}')
    assert verify(bad) == 2
    assert "not a fedslm report of schema version 1" in capsys.readouterr().err


def test_report_to_another_folder(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    assert report(run, out) == 0
    assert (out / "report.html").is_file()
    assert (out / "sites" / "site-1" / "report.json").is_file()
    # finds its run by the run_dir it names
    assert verify(out / "report.json", keys=[run / "sites"]) == 0


# --------------------------------------------------------------------------------------------
# Central DP and baselines


def test_central_dp_report_and_baseline(
    central_run: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = Report.model_validate_json((central_run / "report.json").read_text())
    c = r.privacy.central
    assert c is not None and c.rounds_released == 1 and c.noise_multiplier == 2.0
    assert c.epsilon_analytic_report.accountant == "analytic"
    assert c.epsilon.epsilon == pytest.approx(c.epsilon_analytic_report.epsilon, rel=0.01)
    assert any("Each site as a whole" in g for g in r.summary.guarantees)
    [b] = r.utility.baselines
    assert b.path == str(run.resolve()) and len(b.rounds) == 2 and b.dp_enabled
    assert set(b.epsilons) == set(SITES)
    assert verify(central_run) == 0
    capsys.readouterr()

    copy = Path(shutil.copytree(central_run, central_run.parent / "tampered"))
    data = load(copy / "privacy.json")
    data["central"]["epsilon_analytic"] *= 0.8
    dump(copy / "privacy.json", data)
    assert verify(copy) == 1
    assert "(central-epsilon): privacy.json: field central.epsilon_analytic" in (
        capsys.readouterr().err
    )


def test_baselines_under_the_run_are_picked_up(copy: Path, central_run: Path) -> None:
    folder = copy / "baselines" / "with-central-dp"
    folder.mkdir(parents=True)
    for name in ("metrics.jsonl", "privacy.json"):
        shutil.copy(central_run / name, folder)
    assert report(copy) == 0
    r = Report.model_validate_json((copy / "report.json").read_text())
    assert [(b.name, b.path) for b in r.utility.baselines] == [
        ("with-central-dp", "baselines/with-central-dp")
    ]
    assert verify(copy) == 0


def test_baselines_of_a_run_named_by_a_relative_path_are_found(
    copy: Path, central_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fedslm report runs/x`` from the project folder: the baseline is RUN/baselines/NAME,
    not RUN/RUN/baselines/NAME (found with ``fedslm audit --out runs/demo-audit``)."""
    folder = copy / "baselines" / "pooled"
    folder.mkdir(parents=True)
    for name in ("metrics.jsonl", "privacy.json"):
        shutil.copy(central_run / name, folder)
    monkeypatch.chdir(copy.parent)
    assert report(Path(copy.name)) == 0
    r = Report.model_validate_json((copy / "report.json").read_text())
    assert [(b.name, b.path) for b in r.utility.baselines] == [("pooled", "baselines/pooled")]
    assert verify(Path(copy.name)) == 0


# --------------------------------------------------------------------------------------------
# The page: self-contained, offline, and rendered by a real browser


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.values: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.values += [v for _, v in attrs if v]


def test_html_loads_nothing_from_the_network(run: Path) -> None:
    pages = [p.with_name("report.html") for p in report_files(run)]
    for path in [*pages, ROOT / "docs" / "example-report" / "report.html"]:
        page = path.read_text(encoding="utf-8")
        assert "Content-Security-Policy" in page and "default-src 'none'" in page
        assert not re.search(r"https?://", page), "a URL in the page"
        parser = _Links()
        parser.feed(page)
        assert not parser.tags & {"script", "link", "iframe", "object", "embed", "img"}
        assert "svg" in parser.tags
        for value in parser.values:
            assert "://" not in value and not value.startswith("//"), value
        assert all(u.startswith("#") for u in re.findall(r"url\(([^)]*)\)", page))


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # any name lookup fails: the page must render with no network at all
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=180
    )


needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless rendering needs /usr/bin/chromium (apt-get install chromium)",
)


@needs_chromium
def test_chromium_renders_the_report(run: Path, tmp_path: Path) -> None:
    url = (run / "report.html").resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="summary"' in html and "Each record at site-1 is protected by" in html
    table = html[html.index('id="site-privacy"') :]
    table = table[: table.index("</table>")]
    assert all(s in table for s in SITES) and "PRV accountant" in table
    assert html.count("<svg") >= 3

    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000


def test_a_two_phase_runs_noise_figure_is_its_least_noisy_round(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lp-lora's probe and LoRA rounds run with different noise. Attack: the coordinator writes
    the larger noise multiplier into privacy.json, where the report checks it against the
    sites' min_noise_multiplier; verify recomputes the least noise of the ledger's rounds."""
    out = simulate(
        tmp_path / "run",
        *("--set", "federation.rounds=2", "--set", "train.mode=lp-lora"),
        *("--set", "train.probe.rounds=1"),
    )
    data = load(out / "privacy.json")
    site = data["sites"]["site-1"]
    sigmas = sorted({s["sigma"] for s in site["segments"]})
    assert len(sigmas) == 2 and site["noise_multiplier"] == sigmas[0]
    assert report(out) == 0 and verify(out) == 0
    site["noise_multiplier"] = sigmas[1]
    dump(out / "privacy.json", data)
    capsys.readouterr()
    assert verify(out) == 1
    err = capsys.readouterr().err
    assert "field sites.site-1.noise_multiplier" in err and f"ledger has {sigmas[0]!r}" in err
