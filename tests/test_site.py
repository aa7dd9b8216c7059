"""A site across jobs on one data set: the ledger composes them, whatever the jobs say."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedslm.config import validate_config
from fedslm.job import PreparedJob, prepare_job
from fedslm.privacy.accounting import epsilon
from fedslm.privacy.ledger import PrivacyLedger
from fedslm.site import Site, SiteInputs, SiteRefusal


def _prepare(out: Path, tiny_bert: Path, **privacy: Any) -> PreparedJob:
    raw = {
        "model": {"path": str(tiny_bert)},
        "train": {"local_steps": 2, "batch_size": 16, "max_length": 16},
        "federation": {"sites": 1, "rounds": 2},
        "data": {"synthetic": {"rows_per_site": 120}},
        "privacy": {"target_epsilon": 2.0, **privacy},
        "policy": {
            "default": {
                "privacy": {"allow_no_dp": True, "lifetime_epsilon": 5, "max_epsilon_per_job": 4}
            }
        },
    }
    return prepare_job(validate_config(raw), "test", out)


def _site(p: PreparedJob, job_id: str, ledger: Path) -> Site:
    s = p.sites[0]
    inputs = SiteInputs(s.name, s.files.train, s.files.eval, ledger, policy=s.policy)
    return Site(p.job, p.model, p.labels, inputs, job_id=job_id)


@pytest.mark.integration
def test_second_job_composes_with_the_first(tmp_path: Path, tiny_bert: Path) -> None:
    p = _prepare(tmp_path / "run", tiny_bert)
    ledger = p.sites[0].ledger
    first = _site(p, "job-1", ledger)
    state = first.initial_state()
    for r in (1, 2):
        u = first.train_round(r, state)
        state = u.state
        assert 0 < u.privacy_seconds < u.seconds + 5
    assert u.epsilon == pytest.approx(u.lifetime_epsilon)
    second = _site(p, "job-2", ledger)
    u2 = second.train_round(1, second.initial_state())
    with PrivacyLedger(ledger, create=False) as led:
        segs = led.segments(first.dataset)
    assert len(segs) == 3
    assert u2.lifetime_epsilon == pytest.approx(epsilon(segs, 1e-5, "prv"))
    assert u2.epsilon is not None and u2.epsilon < u.epsilon < u2.lifetime_epsilon


@pytest.mark.integration
def test_a_round_without_dp_is_recorded_as_unbounded_spend(tmp_path: Path, tiny_bert: Path) -> None:
    """A non-DP job (allowed by this policy) exposes the data: the ledger says so, and no DP job
    can afterwards claim the data set is within budget."""
    p = _prepare(tmp_path / "run", tiny_bert, enabled=False)
    ledger = p.sites[0].ledger
    plain = _site(p, "baseline", ledger)
    u = plain.train_round(1, plain.initial_state())
    assert u.segment is None and u.epsilon is None  # nothing to report as a DP guarantee
    with PrivacyLedger(ledger, create=False) as led:
        (entry,) = led.entries()
        assert entry.segment.sigma == 0.0 and math.isinf(entry.epsilon)
        assert led.verify() == []
    dp_job = _prepare(tmp_path / "run2", tiny_bert)
    later = _site(dp_job, "dp-job", ledger)
    with pytest.raises(SiteRefusal, match="lifetime budget is 5"):
        later.train_round(1, later.initial_state())


@pytest.mark.integration
def test_evaluation_reuses_the_encoders_features_only_while_it_is_unchanged(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe round moves the head alone, so the site evaluates it from cached features; the
    figures equal a full pass through the model bit for bit, and any change to a LoRA tensor
    computes the features again."""
    import torch

    from fedslm import site as site_module
    from fedslm.training import evaluate

    p = _prepare(tmp_path / "run", tiny_bert)
    s = _site(p, "job-1", p.sites[0].ledger)
    passes: list[int] = []
    real = site_module.encode_features
    monkeypatch.setattr(
        site_module, "encode_features", lambda *a, **k: passes.append(1) or real(*a, **k)
    )

    def full_pass() -> tuple[float, float]:
        r = evaluate(s.loaded.model, s.eval_data, 7, s.loaded.device)  # other batches, same sums
        return r.loss, r.accuracy

    state = s.initial_state()
    heads = [k for k in state if ".classifier." in k]
    loras = [k for k in state if ".lora_B." in k]
    assert heads and loras
    first = s.evaluate(state)
    moved_head = dict(state) | {heads[0]: state[heads[0]] + 0.5}
    second = s.evaluate(moved_head)
    assert len(passes) == 1 and second.loss != first.loss  # the head moved: the cache was used
    exact = evaluate(s.loaded.model, s.eval_data, p.job.train.eval_batch_size, s.loaded.device)
    assert (second.loss, second.accuracy) == (exact.loss, exact.accuracy)  # bit for bit
    assert second.loss == pytest.approx(full_pass()[0], rel=1e-5)
    moved_lora = dict(moved_head) | {loras[0]: torch.full_like(state[loras[0]], 0.3)}
    third = s.evaluate(moved_lora)
    assert len(passes) == 2 and third.loss != second.loss  # the encoder changed: a new pass
    assert third.loss == pytest.approx(full_pass()[0], rel=1e-5)
