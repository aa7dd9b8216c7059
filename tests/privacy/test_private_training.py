"""A site's DP setup (``fedslm.privacy.private_training``): the plan and the model prepared for
it by its one entry point, ``make_private``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from fedslm.config import JobConfig, LoraConfig
from fedslm.errors import ConfigError
from fedslm.models import load_model
from fedslm.privacy.accounting import epsilon
from fedslm.privacy.private_training import make_private, plan_privacy

pytestmark = pytest.mark.integration

CPU = torch.device("cpu")
LABELS = ["a", "b"]
BUDGET = {"default": {"privacy": {"lifetime_epsilon": 1e4, "max_epsilon_per_job": 1e4}}}


def _job(mode: str, dp: bool = True) -> JobConfig:
    privacy = {"target_epsilon": 8.0, "delta": 1e-4} if dp else {"enabled": False}
    return JobConfig.model_validate(
        {
            "model": {"name": "tiny-bert"},
            "policy": BUDGET,
            "privacy": privacy,
            "train": {"mode": mode},
            "federation": {"rounds": 3},
        }
    )


def _model(tiny_bert: Path) -> torch.nn.Module:
    return load_model(tiny_bert, "classification", LoraConfig(r=2), LABELS, CPU, seed=0).model


def _lora_trainable(model: torch.nn.Module) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_lora_under_dp_gets_per_sample_hooks_once(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    private = make_private(model, _job("lora"), 1000, "job.yaml")
    assert isinstance(private.module, GradSampleModule)
    assert private.module._module is model  # wraps the site's model, not a copy
    assert _lora_trainable(model)
    assert private.plan == plan_privacy(_job("lora"), 1000, "job.yaml")
    phase = private.plan.phase(1)
    dp = private.dp_settings(phase)
    assert dp is not None
    assert (dp.noise_multiplier, dp.max_grad_norm, dp.expected_batch_size) == (
        phase.noise_multiplier,
        private.plan.max_grad_norm,
        phase.batch_size,
    )
    assert phase.noise_multiplier > 0


def test_without_dp_the_model_trains_plainly(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    private = make_private(model, _job("lora", dp=False), 1000, "job.yaml")
    assert private.module is model
    assert private.dp_settings(private.plan.phase(1)) is None
    assert private.plan.segments() == []


def test_a_pure_probe_freezes_lora_and_clips_even_without_dp(tiny_bert: Path) -> None:
    for dp in (True, False):
        model = _model(tiny_bert)
        private = make_private(model, _job("head", dp=dp), 1000, "job.yaml")
        assert private.module is model  # no hooks on the model: the probe trains a copy
        assert not _lora_trainable(model)
        phase = private.plan.phase(1)
        module, settings = private.probe_module(torch.nn.Linear(8, 2), 2.0, phase)
        assert isinstance(module, GradSampleModule)
        # the probe's learning rate assumes clipped gradients, with DP or without
        assert settings.max_grad_norm == private.plan.max_grad_norm
        assert settings.noise_multiplier == (phase.noise_multiplier if dp else 0.0)


def test_lp_lora_hooks_the_model_for_its_lora_phase(tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    private = make_private(model, _job("lp-lora"), 1000, "job.yaml")
    assert [ph.trains for ph in private.plan.phases] == ["head", "lora"]
    assert isinstance(private.module, GradSampleModule)
    assert _lora_trainable(model)


def test_round_segments_compose_to_the_target_under_the_plans_accountant() -> None:
    plan = plan_privacy(_job("lp-lora"), 1000, "job.yaml")
    rounds = [plan.round_segment(r) for r in (1, 2, 3)]
    for r, seg in zip((1, 2, 3), rounds, strict=True):
        phase = plan.phase(r)
        assert (seg.q, seg.sigma, seg.steps) == (
            phase.sample_rate,
            phase.noise_multiplier,
            phase.steps_per_round,
        )
    assert plan.epsilon(rounds) == epsilon(rounds, plan.delta, plan.accountant)
    assert plan.epsilon(rounds) == pytest.approx(8.0, rel=0.02)


def test_a_delta_not_below_one_over_n_names_the_source(tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match=r"job.yaml: privacy.delta=0.0001 must be below 1/N"):
        make_private(_model(tiny_bert), _job("lora"), 20000, "job.yaml")
