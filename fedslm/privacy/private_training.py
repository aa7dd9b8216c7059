"""A site's DP setup in one place: the job's privacy plan and the model made ready for it.

``make_private`` is the one entry point, in the spirit of Opacus' ``PrivacyEngine.make_private``:
given the site's model (LoRA attached, on its device) and its number of training records, it
fixes every round's DP parameters before round 1 (``plan_privacy``: phases, sampling rate,
steps, noise calibrated to the job's target epsilon) and prepares the model once (Opacus'
per-sample hooks for LoRA rounds under DP; LoRA frozen for a pure probe). What it returns,
``PrivateTraining``, answers what a round needs: the round's DP settings and ledger segment,
the module its steps run on, a probe head ready for per-sample clipping, and the epsilon of a
composition under the plan's accountant.

The site (``fedslm.site``) keeps what is not DP: its ledger, its policy and the round itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedslm.config import JobConfig
from fedslm.errors import ConfigError
from fedslm.privacy.accounting import Accountant, Segment, calibrate_noise, epsilon
from fedslm.privacy.dp_sgd import per_sample_module
from fedslm.training import DPSettings, ScaledHead


@dataclass(frozen=True)
class Phase:
    """Consecutive rounds that train the same thing with the same DP parameters.

    ``trains`` is 'head' (a linear probe on frozen features) or 'lora' (LoRA factors and head).
    """

    trains: Literal["head", "lora"]
    first_round: int
    rounds: int
    batch_size: int  # expected logical batch, q * records
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float

    @property
    def total_steps(self) -> int:
        """Every step of this phase, over all its rounds."""
        return self.steps_per_round * self.rounds

    def segment(self, steps: int | None = None) -> Segment:
        """The DP event of ``steps`` of this phase's steps (default: all of them)."""
        return Segment(self.sample_rate, self.noise_multiplier, steps or self.total_steps)


@dataclass(frozen=True)
class PrivacyPlan:
    """What a site trains and with which DP parameters, every round of the job, fixed before
    round 1. lp-lora has two phases (probe, then LoRA); the others one."""

    enabled: bool
    records: int
    phases: tuple[Phase, ...]
    max_grad_norm: float
    delta: float
    accountant: Accountant
    target_epsilon: float | None

    def phase(self, round_num: int) -> Phase:
        """The phase ``round_num`` belongs to."""
        for ph in self.phases:
            if round_num < ph.first_round + ph.rounds:
                return ph
        return self.phases[-1]

    def round_segment(self, round_num: int) -> Segment:
        """The DP event of one round: its phase's parameters over one round's steps (what the
        site's ledger records before the round trains)."""
        phase = self.phase(round_num)
        return phase.segment(phase.steps_per_round)

    def segments(self) -> list[Segment]:
        """The job's DP events, one per phase (empty without DP)."""
        return [ph.segment() for ph in self.phases] if self.enabled else []

    def epsilon(self, segments: list[Segment]) -> float:
        """Epsilon of ``segments`` composed, at this plan's delta, under its accountant."""
        return epsilon(segments, self.delta, self.accountant)

    @property
    def total_steps(self) -> int:
        """Every local step of the job."""
        return sum(ph.total_steps for ph in self.phases)

    # The last (for lora and head: the only) phase's figures, for single-phase callers.
    @property
    def sample_rate(self) -> float:
        """q of the last phase."""
        return self.phases[-1].sample_rate

    @property
    def steps_per_round(self) -> int:
        """Local steps per round of the last phase."""
        return self.phases[-1].steps_per_round

    @property
    def noise_multiplier(self) -> float:
        """Noise multiplier of the last phase."""
        return self.phases[-1].noise_multiplier

    @property
    def min_noise_multiplier(self) -> float:
        """The smallest noise multiplier of any phase (what a site policy's floor checks)."""
        return min(ph.noise_multiplier for ph in self.phases)


def check_delta(job: JobConfig, records: int, source: str) -> None:
    """Refuse a delta that is not below 1/N: it would allow leaking whole records."""
    delta = job.privacy.delta
    if job.privacy.enabled and delta >= 1.0 / records:
        raise ConfigError(
            f"{source}: privacy.delta={delta:g} must be below 1/N = {1 / records:.3g} "
            f"for a site with N={records} training records; use at most "
            f"{min(1e-5, 1 / (10 * records)):.3g}"
        )


def plan_privacy(job: JobConfig, records: int, source: str) -> PrivacyPlan:
    """Phases, sampling rates, steps and noise for a site with ``records`` training rows.

    The noise is calibrated so that all of the job's local steps together meet
    ``privacy.target_epsilon``. With lp-lora the probe rounds alone are calibrated to
    ``train.probe.epsilon_share`` of the target and the LoRA rounds to what brings the
    composition of both to the target. ``source`` names the config file in errors.
    """
    p, t = job.privacy, job.train
    rounds = job.federation.rounds
    mode = job.train_mode
    shapes: list[tuple[Literal["head", "lora"], int, int, float | None]] = []
    probe_batch = t.probe.logical_batch(p.enabled)
    if mode == "head":
        shapes.append(("head", rounds, probe_batch, t.probe.local_epochs))
    elif mode == "lp-lora":
        shapes.append(("head", t.probe.rounds, probe_batch, t.probe.local_epochs))
        shapes.append(("lora", rounds - t.probe.rounds, t.logical_batch(p.enabled), None))
    else:
        shapes.append(("lora", rounds, t.logical_batch(p.enabled), None))
    if p.enabled:
        check_delta(job, records, source)
    phases: list[Phase] = []
    first = 1
    for i, (trains, n, batch, epochs) in enumerate(shapes):
        q = min(1.0, batch / records)
        steps = max(1, round(epochs / q)) if epochs is not None else t.steps_per_round(q)
        sigma = 0.0
        if p.enabled and p.noise_multiplier is not None:
            sigma = p.noise_multiplier
        elif p.enabled:
            assert p.target_epsilon is not None
            last = i == len(shapes) - 1
            target = p.target_epsilon if last else p.target_epsilon * t.probe.epsilon_share
            prior = [ph.segment() for ph in phases]
            sigma = calibrate_noise(target, p.delta, q, steps * n, p.accountant, prior=prior)
        phases.append(Phase(trains, first, n, max(1, round(q * records)), q, steps, sigma))
        first += n
    return PrivacyPlan(
        p.enabled,
        records,
        tuple(phases),
        p.max_grad_norm,
        p.delta,
        p.accountant,
        p.target_epsilon if p.enabled else None,
    )


@dataclass(frozen=True)
class PrivateTraining:
    """A site's model made ready for its privacy plan (built by ``make_private``).

    ``module`` is what LoRA rounds step: under DP the model wrapped once for per-sample
    gradients (its hooks live as long as the model), else the model itself.
    """

    plan: PrivacyPlan
    module: torch.nn.Module

    def dp_settings(self, phase: Phase) -> DPSettings | None:
        """Clipping and noise of ``phase``'s steps (None without DP: plain steps)."""
        if not self.plan.enabled:
            return None
        return DPSettings(phase.noise_multiplier, self.plan.max_grad_norm, phase.batch_size)

    def probe_module(
        self, head: torch.nn.Linear, logit_scale: float, phase: Phase
    ) -> tuple[torch.nn.Module, DPSettings]:
        """A probe round's module and its DP settings: ``head`` on precomputed features,
        wrapped for per-sample gradients.

        The probe clips each example's gradient even without DP (noise 0): its learning rate
        is chosen for clipped gradients, and unclipped ones through scaled logits are ten
        times larger. The caller trains a copy of the model's head: hooks on the model's own
        head would fire for the LoRA phase's per-sample module too.
        """
        dp = self.dp_settings(phase) or DPSettings(0.0, self.plan.max_grad_norm, phase.batch_size)
        return per_sample_module(ScaledHead(head, logit_scale)), dp


def make_private(
    model: torch.nn.Module, job: JobConfig, records: int, source: str
) -> PrivateTraining:
    """Plan ``job``'s DP for a site with ``records`` training rows and prepare ``model`` for it.

    ``model`` must already carry LoRA, on its device, with any rule-specific freezing done
    (``AggregationRule.prepare_model``: ffa's frozen A must get no per-sample hooks), and no
    optimizer may exist yet: Opacus' hooks are attached here, once. A pure probe job trains
    the head on frozen features only, so LoRA is frozen at its no-op initialisation. Raises
    ``ConfigError`` naming ``source`` when the job's delta is not below 1/``records``.
    """
    plan = plan_privacy(job, records, source)
    module = model
    if all(ph.trains == "head" for ph in plan.phases):
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.requires_grad_(False)
    elif plan.enabled:
        module = per_sample_module(model)
    return PrivateTraining(plan, module)
