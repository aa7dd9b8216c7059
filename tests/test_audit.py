"""``fedslm audit``: canaries, the DP-off control's power, a broken pipeline caught, the rule
that keeps canaries out of real data, and the report's "Empirical check" section (tiny BERT,
synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedslm.audit import EXIT_OK, EXIT_VIOLATION
from fedslm.audit.canaries import data_refusal
from fedslm.audit.run import count_correct, run_audit
from fedslm.config import JobConfig
from fedslm.errors import ConfigError

M = 120


def write_config(folder: Path, epsilon: float, **data) -> Path:
    """A small job that memorises well without DP: 1 site, 1 round, many LoRA epochs."""
    job = {
        "seed": 3,
        "model": {"name": "tiny-bert"},
        "task": {"type": "classification"},
        "lora": {"r": 8, "alpha": 16},
        "train": {
            "mode": "lora",
            "local_epochs": 30,
            "batch_size": 32,
            "learning_rate": 0.05,
            "max_length": 32,
        },
        "privacy": {"enabled": True, "target_epsilon": epsilon, "delta": 1.0e-5},
        "federation": {"sites": 1, "rounds": 1},
        "data": data or {"synthetic": {"rows_per_site": 120, "skew": 1.0}},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path):
    folder = tmp_path_factory.mktemp("audit")
    config = write_config(folder, epsilon=1.0)
    return run_audit(config, folder / "out", canaries=M), folder


def test_audit_passes_with_a_powerful_control(audit, module_ledgers: Path) -> None:
    result, _ = audit
    assert result.control.bound.epsilon >= result.min_control_epsilon, result.verdict
    assert result.audited.formal_epsilon == pytest.approx(1.0, rel=0.02)
    assert result.audited.accountant == "prv"
    assert result.audited.bound.epsilon <= result.audited.formal_epsilon
    assert result.exit_code == EXIT_OK, result.verdict
    saved = json.loads((result.out / "audit.json").read_text())
    assert saved["control"]["lower_bound"] == result.control.bound.epsilon
    assert saved["canaries"] == M and saved["audited"]["confidence"] == pytest.approx(0.95)
    assert "cannot certify" in (result.out / "audit.md").read_text()
    # the real ledger folder is never touched: the audit keeps its own
    assert not any(module_ledgers.iterdir())


def test_canaries_and_bits_stay_in_the_audit_record(audit) -> None:
    result, _ = audit
    record = json.loads((result.out / "canaries.json").read_text())["canaries"]
    assert len(record) == M and sum(c["included"] for c in record) == result.included
    outsiders = [c["row"]["text"] for c in record if not c["included"]]
    members = [c["row"]["text"] for c in record if c["included"]]
    for path in result.out.rglob("*"):
        if not path.is_file() or path.name == "canaries.json" or path.suffix in (".db", ".key"):
            continue
        text = path.read_text(errors="replace")
        # a canary left out of training appears nowhere but in canaries.json
        assert not any(t in text for t in outsiders), path
        # members are only in the audited site's training file (and the control's copy)
        if any(t in text for t in members):
            assert path.name == "train.jsonl" and f"sites/{result.site}/data" in str(path)
    assert all(t not in (result.out / "audit.json").read_text() for t in members)


def test_broken_pipeline_is_flagged(tmp_path: Path, tiny_bert: Path) -> None:
    """Noise never applied while the ledger records epsilon 0.3: the bound exceeds it.

    (Clipping still applies, so the broken run leaks less than the unclipped control: measured
    0.74 against a control of 1.6 with these settings; a claim of 1 was not exceeded.)"""
    config = write_config(tmp_path, epsilon=0.3)
    result = run_audit(config, tmp_path / "out", canaries=M, _remove_noise=True)
    assert result.audited.formal_epsilon == pytest.approx(0.3, rel=0.02)
    assert result.audited.bound.epsilon > 0.3, result.verdict
    assert result.violation and result.exit_code == EXIT_VIOLATION
    assert "FAILED" in (tmp_path / "out" / "audit.md").read_text()


def test_report_has_the_empirical_check(audit) -> None:
    from fedslm.report import write_reports
    from fedslm.report.verify import verify_path

    result, _ = audit
    written = write_reports(result.out)
    check = written[0].report.empirical_check
    assert check is not None and check.same_job is True
    assert check.audited.lower_bound == result.audited.bound.epsilon
    assert check.control.lower_bound == result.control.bound.epsilon
    html = written[0].html_path.read_text()
    assert "Empirical check" in html and "cannot certify" in html
    assert verify_path(result.out, {}, allow_unsigned=True).code == 0


def test_count_correct_guesses_the_top_scores() -> None:
    scores = [0.9, 0.1, 0.8, 0.7, -0.2, 0.05]
    included = [True, False, False, True, False, True]
    assert count_correct(scores, included, [1, 2, 3, 6]) == {1: 1, 2: 1, 3: 2, 6: 3}


def test_deployed_jobs_and_real_data_are_refused(tmp_path: Path) -> None:
    at_sites = write_config(tmp_path, 1.0, at_sites=True, labels=["a", "b"])
    with pytest.raises(ConfigError, match="deployed job"):
        run_audit(at_sites, tmp_path / "out1", canaries=10)
    # a data file outside the config's folder and the temporary folder is a real data set
    config = Path("/srv/experiments/job.yaml")
    raw = yaml.safe_load(write_config(tmp_path, 1.0).read_text())
    for data, refused in (
        ({"path": "/srv/hospital/records.csv"}, True),
        ({"sites": {"site-1": "/data/b.csv"}}, True),
        ({"path": "/srv/experiments/public/d.csv"}, False),
        ({"path": str(tmp_path / "d.csv")}, False),
        ({"synthetic": {"rows_per_site": 50}}, False),
    ):
        job = JobConfig.model_validate(raw | {"data": data})
        why = data_refusal(job, config)
        assert (why is not None) == refused, data
        if refused:
            assert "--allow-site-data" in why and "/srv/experiments" in why
    off = write_config(tmp_path, 1.0)
    with pytest.raises(ConfigError, match="no epsilon to audit"):
        run_audit(off, tmp_path / "out2", overrides=["privacy.enabled=false"], canaries=10)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_audit_plan_keeps_canaries_and_real_ledgers_apart(tmp_path: Path, tiny_bert: Path) -> None:
    """Canaries go into one site's training rows only; a policy's real ledger is never used;
    the control is the same plan with DP off."""
    from fedslm.audit.canaries import make_canaries
    from fedslm.audit.run import _audit_plan
    from fedslm.config import load_config
    from fedslm.job import plan_job

    raw = yaml.safe_load(write_config(tmp_path, 1.0).read_text())
    raw["federation"] = {"sites": 2, "rounds": 1}
    raw["policy"] = {"default": {"ledger": str(tmp_path / "real-ledger.db")}}
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw))
    plan = plan_job(load_config(config), str(config))
    canaries = make_canaries(plan.job, ["alpha", "bravo", "charlie"], plan.labels, 40, seed=5)
    assert 5 < sum(canaries.included) < 35  # probability 1/2 each, seeded
    assert canaries == make_canaries(plan.job, ["alpha", "bravo", "charlie"], plan.labels, 40, 5)
    audited = _audit_plan(plan, "site-2", canaries)
    control = _audit_plan(plan, "site-2", canaries, dp=False)
    for p in (audited, control):
        before = {s.name: s for s in plan.sites}
        one, two = p.sites
        assert one.train == before["site-1"].train and two.eval == before["site-2"].eval
        assert two.train == before["site-2"].train + canaries.members
        assert len(two.train_labels) == len(two.train)
        assert all(pol.ledger is None for pol in p.policies.values())
    assert audited.job == plan.job and control.job.privacy.enabled is False
    assert plan.policies["site-1"].ledger  # the job's own plan is left as it was
