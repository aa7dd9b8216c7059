"""``fedslm audit``: canaries, the DP-off control's power, a broken pipeline caught, the rule
that keeps canaries out of real data, and the report's "Empirical check" section (tiny BERT,
synthetic data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fedslm.audit import EXIT_OK, EXIT_VIOLATION
from fedslm.audit.bound import best_bound
from fedslm.audit.canaries import data_refusal
from fedslm.audit.run import count_correct, run_audit
from fedslm.config import JobConfig
from fedslm.errors import ConfigError

M = 200  # canaries
# The broken pipeline's claimed epsilon, the "noise off while the ledger claims 1";
# its measured bound is 1.84 (test_broken_pipeline_is_flagged).
BROKEN_CLAIM = 1.0


def write_config(folder: Path, epsilon: float, **data) -> Path:
    """A small job that memorises well without DP, in seconds: the DP linear probe
    (``train.mode: head``, trained on cached features) of 1 site, 2 rounds of 300 epochs, on
    20 synthetic rows, so the ~100 included canaries are most of what it trains on."""
    job = {
        "seed": 3,
        "model": {"name": "tiny-bert"},
        "task": {"type": "classification"},
        "train": {"mode": "head", "max_length": 32, "probe": {"local_epochs": 300}},
        "privacy": {"enabled": True, "target_epsilon": epsilon, "delta": 1.0e-5},
        "federation": {"sites": 1, "rounds": 2},
        "data": data or {"synthetic": {"rows_per_site": 20, "skew": 1.0}},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path):
    folder = tmp_path_factory.mktemp("audit")
    config = write_config(folder, epsilon=1.0)
    return run_audit(config, folder / "out", canaries=M), folder


@pytest.mark.integration
def test_audit_passes_with_a_powerful_control(audit, module_ledgers: Path) -> None:
    """Measured 2026-12-07: control 1.843 (r=100, v=94: 94 of the 100 highest-scoring
    canaries were members), the audited run at epsilon 1 with DP 0.000 (best at r=10, v=6);
    both arms in 11 s at load 3.5 (38 s at load 6). Everything is seeded and the tiny BERT is
    the same on every build, so these figures are too."""
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_broken_pipeline_is_flagged(tmp_path: Path, tiny_bert: Path) -> None:
    """Noise never applied while the ledger records epsilon 1: the bound exceeds it.

    Measured 2026-12-07: 1.843 (r=100, v=94), the control's figure (the probe clips per
    example with or without DP, so only the noise told the arms apart), 0.84 above the claim.
    Before the tiny BERT's vocabulary was made the same on every build, four builds' canary
    draws gave 1.38, 1.38, 1.64 and 2.10 (with 100 local epochs instead of 300 the lowest was
    1.17): the margin holds across canary draws, not only for this one."""
    from fedslm.report.verify import verify_path

    config = write_config(tmp_path, epsilon=BROKEN_CLAIM)
    result = run_audit(config, tmp_path / "out", canaries=M, _remove_noise=True)
    assert result.audited.formal_epsilon == pytest.approx(BROKEN_CLAIM, rel=0.02)
    assert result.audited.bound.epsilon > BROKEN_CLAIM, result.verdict
    assert result.violation and result.exit_code == EXIT_VIOLATION
    assert "FAILED" in (tmp_path / "out" / "audit.md").read_text()
    # the report's check says so too, from the run's own privacy.json
    outcome = verify_path(result.out, {}, allow_unsigned=True)
    assert outcome.code == 1 and "(empirical-claim)" in outcome.message, outcome.message
    claimed = json.loads((result.out / "privacy.json").read_text())["sites"][result.site]
    assert (
        f"empirical lower bound {result.audited.bound.epsilon:.3f} exceeds the claimed "
        f"epsilon {claimed['epsilon']:.3f}" in outcome.message
    ), outcome.message


@pytest.mark.integration
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


def _audit_copy(audit, tmp_path: Path, *, canaries: bool = True) -> Path:
    """The module's audit folder, copied (without its reports) to be edited; ``canaries``
    False leaves canaries.json out (an audit.json copied beside another run of the job)."""
    result, _ = audit
    run = tmp_path / "run"
    shutil.copytree(result.out, run, symlinks=True)
    _drop_reports(run)
    if not canaries:
        (run / "canaries.json").unlink()
    return run


def _drop_reports(run: Path) -> None:
    for path in [*run.glob("report.*"), *run.glob("sites/*/report.*")]:
        path.unlink()


def _edit(run: Path, arm: str, counts: dict[int, int] | None = None, **fields) -> None:
    """Edit audit.json: ``counts`` (r -> v) replace an arm's right guesses, with every bound
    made consistent with them as a careful forger would (``fedslm.audit.bound``); ``fields``
    then overwrite keys of the arm (or, ``top_KEY``, of the file)."""
    path = run / "audit.json"
    data = json.loads(path.read_text())
    part = data[arm]
    if counts is not None:
        bound = best_bound(data["canaries"], counts, part["delta"], 1 - part["confidence"])
        part["per_guesses"] = {
            str(r): {"correct": v, "lower_bound": e} for r, (v, e) in bound.per_r.items()
        }
        part.update(lower_bound=bound.epsilon, guesses=bound.guesses, correct=bound.correct)
    for key, value in fields.items():
        if key.startswith("top_"):
            data[key[4:]] = value
        else:
            part[key] = value
    path.write_text(json.dumps(data))


def _verified(run: Path):
    from fedslm.report.verify import verify_path

    return verify_path(run, {}, allow_unsigned=True)


@pytest.mark.integration
def test_report_checks_the_empirical_check(audit, tmp_path: Path) -> None:
    """The audit folder as written passes the three empirical checks, and they are in the
    report; a run without audit.json has none of them."""
    from fedslm.report import checks
    from fedslm.report.runfiles import RunContext, load_run

    run = _audit_copy(audit, tmp_path)
    results = checks.run_checks(RunContext(load_run(run)), ["site-1"])
    empirical = {c.name: c for c in results if c.name.startswith("empirical-")}
    assert set(empirical) == {"empirical-bounds", "empirical-claim", "empirical-power"}
    assert all(c.passed for c in results), [c.detail for c in results if not c.passed]
    outcome = _verified(run)
    assert outcome.code == 0 and f": {len(results)} checks passed" in outcome.message
    (run / "audit.json").unlink()
    (run / "canaries.json").unlink()
    without = checks.run_checks(RunContext(load_run(run)), ["site-1"])
    assert len(without) == len(results) - 3
    assert not any(c.name.startswith("empirical-") for c in without)
    assert f": {len(without)} checks passed" in _verified(run).message


@pytest.mark.integration
@pytest.mark.parametrize("canaries", [True, False])
def test_an_edited_lower_bound_fails_verify(audit, tmp_path: Path, canaries: bool) -> None:
    """Attack: after the fact, someone lowers the audited run's bound (one per-r figure, or
    the headline) in audit.json; verify names the figure and its recomputed value."""
    result, _ = audit
    run = _audit_copy(audit, tmp_path, canaries=canaries)
    r = str(result.control.bound.guesses)
    path = run / "audit.json"
    data = json.loads(path.read_text())
    data["control"]["per_guesses"][r]["lower_bound"] = 0.1
    path.write_text(json.dumps(data))
    outcome = _verified(run)
    assert outcome.code == 1 and "(empirical-bounds)" in outcome.message, outcome.message
    assert f"control.per_guesses.{r}.lower_bound: stored 0.1, recomputed " in outcome.message
    run = _audit_copy(audit, tmp_path / "again", canaries=canaries)
    _edit(run, "control", lower_bound=0.4)
    outcome = _verified(run)
    assert "field control.lower_bound: stored 0.4, recomputed " in outcome.message


@pytest.mark.integration
def test_a_lowered_v_fails_verify(audit, tmp_path: Path) -> None:
    """Attack: someone lowers v (the right guesses) of the control. Alone, the recorded bound
    no longer recomputes; with every bound made consistent, canaries.json's scores and
    inclusion bits recount the true v."""
    result, _ = audit
    r, v = result.control.bound.guesses, result.control.bound.correct
    run = _audit_copy(audit, tmp_path, canaries=False)
    path = run / "audit.json"
    data = json.loads(path.read_text())
    data["control"]["per_guesses"][str(r)]["correct"] = v - 10
    path.write_text(json.dumps(data))
    outcome = _verified(run)
    stored = data["control"]["per_guesses"][str(r)]["lower_bound"]
    assert f"control.per_guesses.{r}.lower_bound: stored {stored!r}, recomputed " in outcome.message
    run = _audit_copy(audit, tmp_path / "forged")
    counts = {
        int(k): g["correct"]
        for k, g in json.loads((run / "audit.json").read_text())["control"]["per_guesses"].items()
    }
    _edit(run, "control", {**counts, r: v - 10})
    outcome = _verified(run)
    assert outcome.code == 1 and "(empirical-bounds)" in outcome.message, outcome.message
    assert (
        f"control.per_guesses.{r}.correct: stored {v - 10}, recounted from canaries.json"
        in outcome.message
    )


@pytest.mark.integration
def test_a_bound_above_the_claim_fails_verify(audit, tmp_path: Path) -> None:
    """A (consistent) audit.json whose audited bound exceeds the epsilon in privacy.json
    fails; so does one whose recorded claim was raised to hide it."""
    result, _ = audit
    run = _audit_copy(audit, tmp_path, canaries=False)
    claimed = json.loads((run / "privacy.json").read_text())["sites"][result.site]["epsilon"]
    _edit(run, "audited", {r: r for r in result.audited.bound.per_r})  # every guess right
    forged = json.loads((run / "audit.json").read_text())["audited"]["lower_bound"]
    assert forged > claimed
    outcome = _verified(run)
    assert outcome.code == 1 and "(empirical-claim)" in outcome.message, outcome.message
    assert (
        f"empirical lower bound {forged:.3f} exceeds the claimed epsilon {claimed:.3f}"
        in outcome.message
    )
    _edit(run, "audited", formal_epsilon=3.0, top_violation=False)
    outcome = _verified(run)
    assert "field audited.formal_epsilon: stored 3.0, privacy.json has" in outcome.message


@pytest.mark.integration
def test_an_audit_without_power_is_inconclusive(audit, tmp_path: Path) -> None:
    """A control that did not reach MIN_CONTROL_EPSILON: the check is not passed but
    inconclusive (no figure is wrong), also when the recorded bar was lowered to pass it."""
    from fedslm.report import write_reports

    run = _audit_copy(audit, tmp_path, canaries=False)
    # a control bound of 0.26 (r=40, v=30), below the 0.5 required
    _edit(run, "control", {10: 9, 20: 16, 40: 30, 100: 65}, top_has_power=False)
    assert 0 < json.loads((run / "audit.json").read_text())["control"]["lower_bound"] < 0.5
    report = write_reports(run)[0].report
    power = next(c for c in report.checks if c.name == "empirical-power")
    assert not power.passed and power.inconclusive and "no power" in power.detail
    assert not report.summary.checks_passed and "inconclusive" in report.summary.checks_line
    outcome = _verified(run)
    assert outcome.code == 0 and "empirical-power inconclusive" in outcome.message
    # the bar lowered (as --min-control-epsilon can): still inconclusive for the report
    _drop_reports(run)
    _edit(run, "control", top_min_control_epsilon=0.01, top_has_power=True)
    outcome = _verified(run)
    assert outcome.code == 0 and "empirical-power inconclusive" in outcome.message
    assert "the audit was run with a bar of 0.01" in outcome.message, outcome.message


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


@pytest.mark.integration
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
