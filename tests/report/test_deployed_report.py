"""Reports of deployed runs: a site's signed report made at the site from its own ledger, the
federation report at the coordinator from the run folder and the sites' handed-over reports,
and the governance summary; each attacked the way a site, a coordinator or a reader might.

The deployment here is built from its files (site key pairs, policies, ledgers with egress
logs written through the ledger's own API, the coordinator's registry and a run folder as the
ServerApp writes it), so every attack runs in milliseconds; tests/test_deployment_e2e.py makes
the same reports from a real deployment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedslm.cli import main
from fedslm.egress import Payload, describe
from fedslm.errors import FedSLMError
from fedslm.keys import fingerprint, generate_key, load_public_key
from fedslm.privacy.accounting import Segment, epsilon
from fedslm.privacy.egress_log import record_egress
from fedslm.privacy.ledger import PrivacyLedger
from fedslm.report.checks.files import job_config_sha256
from fedslm.report.federation import (
    add_site_report,
    pseudonym,
    pseudonym_secret,
    write_deployed_reports,
)
from fedslm.report.signing import load_trusted_keys, sign_site_report
from fedslm.report.site_report import read_site_report
from fedslm.report_cli import verify_cmd

pytestmark = pytest.mark.integration

SITES = ("site-a", "site-b", "site-c")
JOB = "job-0123456789ab"
DATASET = "ab" * 32 + ":120"
SEG = Segment(0.1, 1.1, 4)
DELTA = 1e-5
CONFIG = {"federation": {"rounds": 2, "sites": list(SITES)}, "privacy": {"delta": DELTA}}


def verify(path: Path, keys: list[Path] = (), **kw: Any) -> int:  # type: ignore[assignment]
    ns = argparse.Namespace(
        path=path,
        keys=list(keys),
        allow_unsigned=kw.get("allow_unsigned", False),
        policy=kw.get("policy"),
        coordinator_key=kw.get("coordinator_key"),
    )
    return verify_cmd(ns)


def make_site(root: Path, name: str) -> tuple[Path, list[str]]:
    """A site's folder: key pair, policy, and a ledger in which the data set took part in an
    earlier job (refused) and in JOB (two rounds, each spent before its update left)."""
    folder = root / name
    folder.mkdir(parents=True)
    generate_key(folder / "site.key", folder / "site.pub", f"fedslm-site:{name}")
    policy = {
        "ledger": "ledger.db",
        "privacy": {"lifetime_epsilon": 50.0, "max_epsilon_per_job": 20.0},
        "daemon": {
            "name": name,
            "coordinator": "127.0.0.1:9",
            "ca_cert": "ca.crt",
            "key": "site.key",
            "state_dir": "state",
            "runtime_port": 40001,
        },
    }
    (folder / "site.yaml").write_text(yaml.safe_dump(policy))
    hashes = []
    with PrivacyLedger(folder / "ledger.db") as ledger:
        refusal = Payload(
            "refusal", fields={"site": name, "refused": True, "reasons": ["task not allowed"]}
        )
        record_egress(ledger, "job-earlier", 0, "sent", describe(refusal))
        for rnd in (1, 2):
            entry = ledger.record(DATASET, JOB, rnd, SEG, DELTA, "pld")
            hashes.append(entry.hash)
            update = Payload(
                "train",
                tensors={"lora_A": torch.ones(2, 3)},
                metrics={"steps": 4, "train-loss": 1.5},
                fields={"site": name, "ledger_head": entry.hash},
            )
            record_egress(ledger, JOB, rnd, "sent", describe(update))
    return folder, hashes


def make_run(state: Path, name: str, heads: dict[str, list[str]]) -> Path:
    """A deployed run's folder as the coordinator's ServerApp leaves it."""
    run = state / "runs" / name
    run.mkdir(parents=True)
    pubs = {s: (state.parent.parent / s / "site.pub").read_text().strip() for s in SITES}
    manifest = {
        "config": CONFIG,
        "source": "job.yaml",
        "job_id": JOB,
        "labels": ["a", "b"],
        "model": {"path": "/models/tiny", "name": "tiny", "sha256": "0" * 64},
        "deployment": True,
        "sites": [
            {"name": s, "node_id": i + 1, "public_key": pubs[s]} for i, s in enumerate(SITES)
        ],
    }
    (run / "job.json").write_text(json.dumps(manifest))
    eps = epsilon([SEG, SEG], DELTA, "pld")
    sites = {
        s: {
            "records": 120,
            "rounds": 2,
            "dp_enabled": True,
            "refusals": [],
            "epsilon": eps,
            "accountant": "pld",
            "epsilon_recomputed_pld": eps,
            "delta": DELTA,
            "dp_steps": 8,
            "segments": [SEG.to_dict(), SEG.to_dict()],
            "ledger_head": heads[s][-1],
            "ledger_head_seq": 2,
        }
        for s in SITES
    }
    privacy = {
        "sites": sites,
        "job_fingerprint": job_config_sha256(CONFIG),
        "run": {"status": "complete"},
    }
    (run / "privacy.json").write_text(json.dumps(privacy))
    rounds = [
        {
            "round": r,
            "aggregated": True,
            "train_loss": 1.2,
            "eval_loss": 1.1,
            "eval_accuracy": 0.5,
            "sites": {
                s: {
                    "steps": 4,
                    "train_loss": 1.2,
                    "eval_loss": 1.0 + i / 10,
                    "eval_accuracy": 0.4 + i / 10,
                }
                for i, s in enumerate(SITES)
            },
        }
        for r in (1, 2)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return run


@pytest.fixture
def fed(tmp_path: Path) -> dict[str, Any]:
    """Three sites, the coordinator's registry of their keys, and one finished run."""
    heads = {}
    for s in SITES:
        heads[s] = make_site(tmp_path, s)[1]
    state = tmp_path / "coordinator" / "state"
    state.mkdir(parents=True)
    registry = {}
    for i, s in enumerate(SITES):
        line = (tmp_path / s / "site.pub").read_text().strip()
        registry[s] = {
            "public_key": line,
            "fingerprint": fingerprint(load_public_key(line)),
            "node_id": i + 1,
        }
    (state / "sites.json").write_text(json.dumps(registry))
    run = make_run(state, "run-1", heads)
    return {
        "root": tmp_path,
        "state": state,
        "run": run,
        "registry": state / "sites.json",
        "heads": heads,
    }


def site_report(fed: dict[str, Any], site: str, *extra: str) -> Path:
    out = fed["root"] / site / "out"
    policy = fed["root"] / site / "site.yaml"
    assert main(["site", "report", "--policy", str(policy), "--out", str(out), *extra]) == 0
    return out


def hand_over(fed: dict[str, Any], sites: tuple[str, ...] = SITES) -> None:
    trusted = load_trusted_keys([fed["registry"]])
    for s in sites:
        add_site_report(fed["run"], site_report(fed, s, "--job", JOB), trusted)


def coordinator_report(fed: dict[str, Any]) -> Any:
    return write_deployed_reports(fed["run"], load_trusted_keys([fed["registry"]]), fed["state"])


# --------------------------------------------------------------------------------------------
# At the site


def test_site_report_shows_jobs_spend_messages_refusals_and_head(fed: dict[str, Any]) -> None:
    out = site_report(fed, "site-a", "--job", JOB)
    assert {p.name for p in out.iterdir()} == {"report.json", "report.html", "report.sig"}
    r = read_site_report(out / "report.json")
    assert r.site == "site-a" and r.job_id == JOB
    assert [j.job_id for j in r.jobs] == ["job-earlier", JOB]  # every job of the data set
    assert [e.round for e in r.job(JOB).entries] == [1, 2]
    want = epsilon([SEG, SEG], DELTA, "pld")
    assert r.spend.spent.epsilon == pytest.approx(want) and r.spend.budget.lifetime == 50.0
    assert r.spend.remaining == pytest.approx(50.0 - want)
    assert [(m.kind, m.round) for m in r.messages] == [("train", 1), ("train", 2)]
    assert r.ledger.entries_seq == 2 and r.ledger.entries_hash == fed["heads"]["site-a"][-1]
    assert all(c.passed for c in r.checks)
    # no path of the site's leaves with its report
    text = (out / "report.json").read_text()
    assert str(fed["root"]) not in text and "ledger.db" not in text
    # every job: the earlier job's refusal is listed
    everything = read_site_report(site_report(fed, "site-a") / "report.json")
    assert [f.reasons for f in everything.refusals] == [["task not allowed"]]


def test_site_verifies_its_report_and_a_later_job_does_not_break_it(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = site_report(fed, "site-b", "--job", JOB)
    policy = fed["root"] / "site-b" / "site.yaml"
    assert verify(out / "report.json", policy=policy) == 0
    assert "daemon.key" in capsys.readouterr().out
    with PrivacyLedger(fed["root"] / "site-b" / "ledger.db") as ledger:
        ledger.record(DATASET, "job-later", 1, SEG, DELTA, "pld")
    assert verify(out / "report.json", policy=policy) == 0
    # without the policy there is nothing to recompute from: said, not passed
    assert verify(out / "report.json") == 2


def test_an_edited_site_report_fails_at_the_site(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = site_report(fed, "site-a", "--job", JOB)
    policy = fed["root"] / "site-a" / "site.yaml"
    data = json.loads((out / "report.json").read_text())
    data["spend"]["remaining"] = 49.9
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    assert verify(out / "report.json", policy=policy) == 1
    assert "spend.remaining" in capsys.readouterr().err
    # the same edit re-signed with another key: the figures are rebuilt, the edit is found
    out2 = site_report(fed, "site-a", "--job", JOB)
    text = (out2 / "report.json").read_text().replace('"messages_sent": 2', '"messages_sent": 1')
    (out2 / "report.json").write_text(text)
    assert verify(out2 / "report.json", policy=policy) == 1


def test_a_rewritten_ledger_fails_the_site_report(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = site_report(fed, "site-c", "--job", JOB)
    with sqlite3.connect(fed["root"] / "site-c" / "ledger.db") as db:
        db.execute("UPDATE entries SET steps = 1 WHERE round = 2")
    assert verify(out / "report.json", policy=fed["root"] / "site-c" / "site.yaml") == 1
    assert "site-c" in capsys.readouterr().err


def test_site_report_signed_with_another_key_fails_at_the_site(fed: dict[str, Any]) -> None:
    out = site_report(fed, "site-a", "--job", JOB)
    sign_site_report("site-a", out / "report.json", fed["root"] / "site-b" / "site.key")
    assert verify(out / "report.json", policy=fed["root"] / "site-a" / "site.yaml") == 1


def test_a_spend_over_the_sites_budget_fails_the_report_and_verify(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    policy = fed["root"] / "site-a" / "site.yaml"
    data = yaml.safe_load(policy.read_text())
    data["privacy"] = {"lifetime_epsilon": 2.0, "max_epsilon_per_job": 1.0}
    policy.write_text(yaml.safe_dump(data))
    out = fed["root"] / "site-a" / "out"
    assert main(["site", "report", "--policy", str(policy), "--out", str(out)]) == 1
    r = read_site_report(out / "report.json")
    assert r.spend.within_budget is False and r.job(JOB).within_per_job_limit is False
    capsys.readouterr()
    assert verify(out / "report.json", policy=policy) == 1
    assert "verify FAILED (budgets)" in capsys.readouterr().err


def test_an_update_that_left_without_a_ledger_entry_fails_the_report(
    fed: dict[str, Any],
) -> None:
    """A site whose code released an update it never charged (a round trained outside the
    ledger) is caught by its own report."""
    with PrivacyLedger(fed["root"] / "site-b" / "ledger.db") as ledger:
        update = Payload("train", tensors={"lora_A": torch.ones(2, 3)}, fields={"site": "site-b"})
        record_egress(ledger, JOB, 3, "sent", describe(update))
    policy = fed["root"] / "site-b" / "site.yaml"
    out = fed["root"] / "site-b" / "out"
    assert main(["site", "report", "--policy", str(policy), "--out", str(out)]) == 1
    check = next(c for c in read_site_report(out / "report.json").checks if not c.passed)
    assert check.name == "spend_before_release" and "round 3" in check.detail


# --------------------------------------------------------------------------------------------
# At the coordinator


def test_federation_report_from_the_run_and_the_signed_site_reports(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    hand_over(fed)
    full, _summary = coordinator_report(fed)
    assert [o.site for o in full.sites] == list(SITES)
    assert all(o.report_received and o.signature_verified and o.agrees for o in full.sites)
    assert all(c.passed for c in full.checks)
    assert "3 of 3" in full.summary[1]
    assert verify(fed["run"], [fed["registry"]]) == 0
    assert "checked against your keys" in capsys.readouterr().out
    # the sites' own site.pub files are keys an auditor may hold just as well
    assert verify(fed["run"] / "report.json", [fed["root"] / s / "site.pub" for s in SITES]) == 0
    # no keys: figures check, but nobody vouches for the site reports
    assert verify(fed["run"]) == 3


def test_fedslm_report_on_a_deployed_run_says_what_to_run(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(fed["run"])]) == 2
    assert "fedslm coordinator report" in capsys.readouterr().err


def test_a_site_report_not_handed_over_is_said_not_received(fed: dict[str, Any]) -> None:
    hand_over(fed, ("site-a", "site-b"))
    full, _ = coordinator_report(fed)
    c = next(o for o in full.sites if o.site == "site-c")
    assert not c.report_received and not c.signature_verified and c.site_spent is None
    assert "none received from site-c" in full.summary[1]
    assert verify(fed["run"], [fed["registry"]]) == 0


def test_a_site_report_edited_after_signing_fails_verify_naming_the_site(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    hand_over(fed)
    coordinator_report(fed)
    path = fed["run"] / "site-reports" / "site-b" / "report.json"
    path.write_text(path.read_text().replace('"lifetime": 50.0', '"lifetime": 500.0'))
    assert verify(fed["run"], [fed["registry"]]) == 1
    err = capsys.readouterr().err
    assert "site site-b" in err and "signature" in err


def test_a_coordinator_cannot_forge_a_site_report(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The coordinator writes a report for site-c itself (more budget left), signs it with a
    key of its own and puts that key beside it (report.sig) and in job.json's roster."""
    hand_over(fed)
    forger = fed["root"] / "forger"
    generate_key(forger / "site.key", forger / "site.pub", "")
    path = fed["run"] / "site-reports" / "site-c" / "report.json"
    path.write_text(path.read_text().replace('"lifetime": 50.0', '"lifetime": 500.0'))
    sign_site_report("site-c", path, forger / "site.key")
    manifest = json.loads((fed["run"] / "job.json").read_text())
    manifest["sites"][2]["public_key"] = (forger / "site.pub").read_text().strip()
    (fed["run"] / "job.json").write_text(json.dumps(manifest))
    # refused on receipt ...
    with pytest.raises(FedSLMError, match="site site-c"):
        add_site_report(fed["run"], path, load_trusted_keys([fed["registry"]]))
    # ... marked rejected in the report, and failed by verify against the registry
    full, _ = coordinator_report(fed)
    c = next(o for o in full.sites if o.site == "site-c")
    assert c.report_received and not c.signature_verified and "REJECTED" in c.status
    assert not next(ch for ch in full.checks if ch.name == "site_signatures").passed
    assert verify(fed["run"], [fed["registry"]]) == 1
    assert "site site-c" in capsys.readouterr().err


def test_another_sites_genuine_report_in_a_sites_place_fails(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """site-a's report, validly signed by site-a, filed as site-b's: the signature covers the
    site's name, so it is not site-b's."""
    hand_over(fed, ("site-a",))
    theirs = fed["run"] / "site-reports" / "site-a"
    shutil.copytree(theirs, fed["run"] / "site-reports" / "site-b")
    full, _ = coordinator_report(fed)
    assert not next(o for o in full.sites if o.site == "site-b").signature_verified
    assert verify(fed["run"], [fed["registry"]]) == 1
    assert "site site-b" in capsys.readouterr().err


def test_a_report_claiming_a_site_report_it_never_received_fails(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    hand_over(fed, ("site-a", "site-b"))
    coordinator_report(fed)
    path = fed["run"] / "report.json"
    data = json.loads(path.read_text())
    c = next(o for o in data["sites"] if o["site"] == "site-c")
    c.update(report_received=True, signature_verified=True, status="received, signed")
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert verify(fed["run"], [fed["registry"]]) == 1
    err = capsys.readouterr().err
    assert "sites[site-c].report_received" in err
    # and a site report removed after the report was made
    hand_over(fed, ("site-c",))
    coordinator_report(fed)
    shutil.rmtree(fed["run"] / "site-reports" / "site-c")
    assert verify(fed["run"], [fed["registry"]]) == 1
    assert "site-c" in capsys.readouterr().err


def test_a_site_report_that_disagrees_with_the_run_is_flagged(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    hand_over(fed)
    privacy = json.loads((fed["run"] / "privacy.json").read_text())
    privacy["sites"]["site-a"]["dp_steps"] = 4  # the coordinator under-counts site-a's spend
    (fed["run"] / "privacy.json").write_text(json.dumps(privacy))
    full, _ = coordinator_report(fed)
    a = next(o for o in full.sites if o.site == "site-a")
    assert a.agrees is False and "DISAGREES" in a.status
    assert not next(ch for ch in full.checks if ch.name == "site_agreement").passed
    # the report says so truthfully, and verify fails on what it says, naming the site
    assert verify(fed["run"], [fed["registry"]]) == 1
    err = capsys.readouterr().err
    assert "verify FAILED (site_agreement)" in err and "site-a" in err


def test_add_report_refuses_another_job_and_an_unregistered_site(fed: dict[str, Any]) -> None:
    trusted = load_trusted_keys([fed["registry"]])
    with PrivacyLedger(fed["root"] / "site-a" / "ledger.db") as ledger:
        ledger.record(DATASET, "job-other", 1, SEG, DELTA, "pld")
    other = site_report(fed, "site-a", "--job", "job-other")
    with pytest.raises(FedSLMError, match=f"does not cover job {JOB}"):
        add_site_report(fed["run"], other, trusted)
    del trusted["site-b"]
    with pytest.raises(FedSLMError, match="not registered"):
        add_site_report(fed["run"], site_report(fed, "site-b", "--job", JOB), trusted)


# --------------------------------------------------------------------------------------------
# The governance summary


def test_governance_summary_hides_names_and_per_site_metrics_and_verifies(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    hand_over(fed)
    _full, summary = coordinator_report(fed)
    folder = fed["run"] / "governance"
    text = (folder / "report.json").read_text() + (folder / "report.html").read_text()
    for s in SITES:
        assert s not in text
    assert all(not u.sites for u in summary.utility)
    assert all(o.records is None and o.registered_key is None for o in summary.sites)
    secret = pseudonym_secret(fed["state"])
    assert sorted(o.site for o in summary.sites) == sorted(pseudonym(secret, s) for s in SITES)
    pub = fed["state"] / "report.pub"
    assert verify(folder / "report.json", coordinator_key=pub) == 0
    assert verify(folder / "report.json") == 3  # nobody vouches without the coordinator's key
    # stable across runs of the federation, different under another secret
    run2 = make_run(fed["state"], "run-2", fed["heads"])
    _, summary2 = write_deployed_reports(run2, load_trusted_keys([fed["registry"]]), fed["state"])
    assert [o.site for o in summary2.sites] == [o.site for o in summary.sites]
    assert pseudonym(b"another secret of 32 bytes......", "site-a") != pseudonym(secret, "site-a")
    capsys.readouterr()


def test_an_edited_governance_summary_fails(
    fed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    hand_over(fed)
    coordinator_report(fed)
    path = fed["run"] / "governance" / "report.json"
    pub = fed["state"] / "report.pub"
    original = path.read_text()
    data = json.loads(original)
    data["sites"][0]["epsilon_recomputed"]["epsilon"] = 0.5  # a stronger guarantee than ran
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert verify(path, coordinator_key=pub) == 1
    assert "epsilon_recomputed" in capsys.readouterr().err
    # an arithmetic-consistent edit (budget, remaining and summary together) is caught too
    data = json.loads(original)
    o = data["sites"][1]
    o["site_budget"]["lifetime"] += 100
    o["site_remaining"] += 100
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert verify(path, coordinator_key=pub) == 1
    # an edit no figure depends on fails the coordinator's signature
    data = json.loads(original)
    data["sites"][1]["report_sha256"] = "0" * 64
    path.write_text(json.dumps(data, indent=2) + "\n")
    assert verify(path, coordinator_key=pub) == 1
    assert "signature" in capsys.readouterr().err
    # re-signed by someone else: fails against the coordinator's published key
    other = fed["root"] / "other"
    generate_key(other / "site.key", other / "site.pub", "")
    sign_site_report("coordinator", path, other / "site.key")
    assert verify(path, coordinator_key=pub) == 1


def test_a_released_site_report_anchors_the_sites_ledger(fed: dict[str, Any]) -> None:
    """The head a site's report names is anchored outside the ledger: a ledger whose every
    hash was rewritten after the report left the site no longer extends it."""
    from fedslm.privacy.anchors import read_anchors
    from fedslm.privacy.ledger_cli import verify_file

    out = site_report(fed, "site-a", "--job", JOB)
    anchors = read_anchors(out / "report.json")
    assert [(a.seq, a.hash) for a in anchors] == [(2, fed["heads"]["site-a"][-1])]
    ledger = fed["root"] / "site-a" / "ledger.db"
    assert verify_file(ledger, [out / "report.json"]) == 0
    # rewrite the ledger consistently (new data set, same shape): chain intact, anchor broken
    ledger.unlink()
    for suffix in ("-wal", "-shm", ".heads"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    with PrivacyLedger(ledger) as rewritten:
        for rnd in (1, 2):
            rewritten.record(DATASET, JOB, rnd, Segment(0.1, 5.0, 4), DELTA, "pld")
    assert verify_file(ledger, [out / "report.json"]) == 1
