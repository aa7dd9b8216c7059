"""Site policy: validation errors name the file and key; job and round checks refuse correctly."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.errors import ConfigError
from fedslm.policy import SitePolicy, check_job, check_round, load_policy
from fedslm.privacy.accounting import Segment, epsilon

SHA = "a" * 64


def job_checks(policy: SitePolicy, **over: object) -> list[str]:
    args: dict[str, object] = dict(
        task="classification",
        rounds=3,
        model_sha256=SHA,
        dp_enabled=True,
        delta=1e-5,
        noise_multiplier=1.0,
        planned=[Segment(0.05, 1.0, 60)],
        spent=[],
        accountant="prv",
    )
    args.update(over)
    return check_job(policy, **args)  # type: ignore[arg-type]


def test_defaults_allow_a_modest_dp_job() -> None:
    assert job_checks(SitePolicy()) == []


def test_each_rule_refuses_with_a_reason() -> None:
    p = SitePolicy.model_validate(
        {"allowed_base_models": ["b" * 64], "max_rounds": 2, "allowed_tasks": ["causal-lm"]}
    )
    reasons = " | ".join(job_checks(p))
    assert "allowed_tasks" in reasons and "rounds" in reasons and "allowed_base_models" in reasons
    assert "requires DP" in " ".join(job_checks(SitePolicy(), dp_enabled=False))
    assert (
        job_checks(SitePolicy.model_validate({"privacy": {"allow_no_dp": True}}), dp_enabled=False)
        == []
    )
    assert "max_delta" in " ".join(job_checks(SitePolicy(), delta=1e-4))
    assert "noise multiplier" in " ".join(job_checks(SitePolicy(), noise_multiplier=0.1))


def test_budget_counts_earlier_jobs() -> None:
    planned = [Segment(0.05, 1.0, 60)]
    one_job = epsilon(planned, 1e-5, "prv")
    policy = SitePolicy.model_validate(
        # composition is sublinear (about sqrt(2) for two jobs), so 1.2x leaves room for one
        {"privacy": {"lifetime_epsilon": one_job * 1.2, "max_epsilon_per_job": one_job * 1.1}}
    )
    assert job_checks(policy, planned=planned) == []
    reasons = job_checks(policy, planned=planned, spent=planned)  # a second identical job
    assert len(reasons) == 1 and "lifetime budget" in reasons[0]
    tight = SitePolicy.model_validate({"privacy": {"max_epsilon_per_job": one_job * 0.9}})
    assert "per job" in job_checks(tight, planned=planned)[0]


def test_round_checks() -> None:
    p = SitePolicy.model_validate(
        {"max_bytes_per_round": 1000, "privacy": {"lifetime_epsilon": 5, "max_epsilon_per_job": 4}}
    )
    ok = check_round(p, bytes_to_send=999, lifetime_epsilon_after=5.0, job_epsilon_after=4.0)
    assert ok == []
    reasons = check_round(p, bytes_to_send=1001, lifetime_epsilon_after=5.1, job_epsilon_after=4.1)
    assert len(reasons) == 3


def test_policy_file_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("privacy:\n  lifetime_epsilon: 2\n  max_epsilon_per_job: 3\n")
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert str(path) in str(err.value) and "max_epsilon_per_job" in str(err.value)
    path.write_text("privacy:\n  lifetime_epsilon: -1\n")
    with pytest.raises(ConfigError, match=r"privacy\.lifetime_epsilon"):
        load_policy(path)
    path.write_text("allowed_base_models: [abc]\n")
    with pytest.raises(ConfigError, match="sha256"):
        load_policy(path)
    path.write_text("max_round: 3\n")
    with pytest.raises(ConfigError, match="max_round"):
        load_policy(path)
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "missing.yaml")


def test_overrides_merge_per_site(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("privacy:\n  lifetime_epsilon: 20\n  max_epsilon_per_job: 8\n")
    p = load_policy(path, {"privacy": {"max_epsilon_per_job": 4}})
    assert p.privacy.lifetime_epsilon == 20 and p.privacy.max_epsilon_per_job == 4
