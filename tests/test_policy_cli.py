"""``fedslm policy check``: a real site's own policy file, its data, its ledger, and a job."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from fedslm.cli import main
from fedslm.data import generate_bank_messages, write_rows
from fedslm.privacy.accounting import Segment
from fedslm.privacy.ledger import DatasetFingerprint, PrivacyLedger


@pytest.fixture
def site(tmp_path: Path, tiny_bert: Path) -> Path:
    """A site folder: data, a policy naming it with relative paths, and a job config."""
    folder = tmp_path / "hospital"
    folder.mkdir()
    write_rows(generate_bank_messages(["a"], 300, seed=1, skew=1.0), folder / "train.jsonl")
    policy = {"data": "train.jsonl", "ledger": "privacy/ledger.db"}
    (folder / "privacy").mkdir()
    (folder / "site.yaml").write_text(yaml.safe_dump(policy))
    job = {
        "model": {"path": str(tiny_bert)},
        "federation": {"rounds": 3},
        "privacy": {"target_epsilon": 3.0},
        "train": {"mode": "lora", "batch_size": 30},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return folder


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.integration
def test_accepts_a_job_and_prints_its_cost(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["policy", "check", str(site / "site.yaml")], capsys)
    assert code == 0
    assert "300 rows" in out and "not created yet" in out
    code, out, _ = _run(
        ["policy", "check", str(site / "site.yaml"), "--job", str(site.parent / "job.yaml")],
        capsys,
    )
    assert code == 0, out
    assert "q = 0.1" in out and "30 in all" in out  # 10 steps per round x 3 rounds
    assert "this job: epsilon 3.0" in out or "this job: epsilon 2.9" in out
    assert "PRVAccountant" in out and "ACCEPTED" in out


@pytest.mark.integration
def test_refuses_what_the_ledger_has_already_spent(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp = DatasetFingerprint.of_file(site / "train.jsonl")
    ledger = site / "privacy" / "ledger.db"
    with PrivacyLedger(ledger, fp) as led:
        led.record(fp, "earlier-job", 1, Segment(0.1, 0.8, 200), 1e-5)
    before = hashlib.sha256(ledger.read_bytes()).hexdigest()
    code, out, _ = _run(
        ["policy", "check", str(site / "site.yaml"), "--job", str(site.parent / "job.yaml")],
        capsys,
    )
    assert code == 1
    assert "REFUSED" in out and "lifetime budget is 10" in out
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before  # only read


@pytest.mark.integration
def test_refuses_a_job_above_the_per_job_cap(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = yaml.safe_load((site / "site.yaml").read_text())
    policy["privacy"] = {"max_epsilon_per_job": 1.0}
    (site / "site.yaml").write_text(yaml.safe_dump(policy))
    code, out, _ = _run(
        ["policy", "check", str(site / "site.yaml"), "--job", str(site.parent / "job.yaml")],
        capsys,
    )
    assert code == 1 and "the site allows 1 per job" in out


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            {"data": "train.jsonl", "privacy": {"max_epsilon_per_job": 20}},
            "larger than privacy.lifetime_epsilon",
        ),
        ({"data": "train.jsonl", "privacy": {"max_delta": 2}}, "privacy.max_delta"),
        ({"data": "train.jsonl", "max_rouns": 3}, "max_rouns"),
        ({"ledger": "l.db"}, "must name the site's data file"),
        ({"data": "missing.jsonl"}, "data file not found"),
    ],
)
def test_bad_policy_is_named(
    site: Path, policy: dict, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (site / "site.yaml").write_text(yaml.safe_dump(policy))
    code, _, err = _run(["policy", "check", str(site / "site.yaml")], capsys)
    assert code == 2
    assert message in err


def test_missing_policy_and_foreign_ledger(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["policy", "check", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "site policy file not found" in err
    other = tmp_path / "other.jsonl"
    write_rows(generate_bank_messages(["b"], 50, seed=2, skew=1.0), other)
    with PrivacyLedger(site / "privacy" / "ledger.db", DatasetFingerprint.of_file(other)):
        pass
    code, _, err = _run(["policy", "check", str(site / "site.yaml")], capsys)
    assert code == 2 and "ledger belongs to data set" in err


@pytest.mark.integration
def test_a_deployed_job_whose_labels_miss_the_sites_data_is_refused(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the site's worker would refuse when the job arrives is refused here first."""
    from fedslm.data import INTENTS

    job = yaml.safe_load((site.parent / "job.yaml").read_text())
    job["data"] = {"at_sites": True, "labels": sorted(INTENTS)}
    (site.parent / "deployed.yaml").write_text(yaml.safe_dump(job))
    args = ["policy", "check", str(site / "site.yaml"), "--job", str(site.parent / "deployed.yaml")]
    code, out, _ = _run(args, capsys)
    assert code == 0, out
    # costed on the rows the site trains on: its evaluation rows are held out first
    assert "DP-SGD on 240 records (60 of 300 rows held out for evaluation)" in out
    assert "q = 0.125" in out
    job["data"]["labels"] = sorted(INTENTS)[1:]  # one label of the site's data is missing
    (site.parent / "deployed.yaml").write_text(yaml.safe_dump(job))
    code, out, _ = _run(args, capsys)
    assert code == 1, out
    assert "REFUSED: the site's data does not fit this job" in out
    assert f"label {sorted(INTENTS)[0]!r}" in out and "train.jsonl" in out
