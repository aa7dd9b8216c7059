"""The training plan a site will follow, in words, before anything is trained.

DP-SGD adds Gaussian noise of standard deviation ``sigma * C`` to the sum of a logical batch's
clipped gradients and divides by the expected batch ``B = q * N``, so each coordinate of the
averaged gradient carries noise of std ``sigma * C / B`` and the whole noise vector has a norm
of about ``sigma * C * sqrt(d) / B`` for ``d`` trained parameters, against a clipped signal of
norm at most ``C``. Their ratio, ``sigma * sqrt(d) / B``, is the noise of one step. Over a
phase of ``T`` steps the signal adds up (``T`` steps in a consistent direction) and the
independent noise only as ``sqrt(T)``, so ``sigma * sqrt(d) / (B * sqrt(T))`` says whether a
site can learn at all: printed before round 1 (``fedslm simulate``/``centralized``) and by
``fedslm policy check --job``, with a plain warning when the noise will swamp the signal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedslm.config import JobConfig
from fedslm.privacy.private_training import Phase, PrivacyPlan

# Above this ratio of a phase's accumulated noise to the largest signal its steps can add up
# to, a site learns next to nothing. Half, not 1: a real averaged gradient is a fraction of
# the clipping bound. On the public data sets (docs/benchmarks.md section 3) DP LoRA sites of
# 129 records (about 0.8) did not learn, probe sites of BANKING77 at epsilon 3 (0.15; 1.5 per
# step) reached 0.75 accuracy over 77 intents.
SWAMPED = 0.5


@dataclass(frozen=True)
class PhaseNoise:
    """The noise of one phase's averaged gradient."""

    std_per_coordinate: float  # sigma * C / B
    norm: float  # about sigma * C * sqrt(d) / B
    ratio: float  # norm / C: one step's noise against the largest possible clipped signal
    phase_ratio: float  # ratio / sqrt(total steps): the same over the whole phase


def phase_noise(phase: Phase, max_grad_norm: float, trainable: int) -> PhaseNoise:
    """Noise figures of ``phase`` for ``trainable`` noised parameters (pure arithmetic)."""
    std = phase.noise_multiplier * max_grad_norm / phase.batch_size
    norm = std * math.sqrt(trainable)
    ratio = norm / max_grad_norm
    return PhaseNoise(std, norm, ratio, ratio / math.sqrt(phase.total_steps))


def trainable_parameters(job: JobConfig, model_dir: Path, num_labels: int) -> dict[str, int]:
    """Noised parameters of a probe step ('head') and a LoRA step ('lora') for ``job``, from
    the model's ``config.json``: the head is ``hidden x labels + labels``; LoRA adds
    ``r x (in + out)`` per targeted projection (only ``out`` with ffa, whose A is frozen),
    counting q and v projections of every layer as fedslm's default targets do."""
    from fedslm.models.memory import architecture_from_config, lora_params

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = architecture_from_config(config, 0.0)
    has_head = job.task.type == "classification" and not job.task.label_words
    head = arch.hidden * num_labels + num_labels if has_head else 0
    r = job.lora.r
    if job.federation.rule.freezes_lora_a:
        lora = arch.layers * r * (arch.hidden + arch.kv_dim)  # B only: r x out per projection
    else:
        lora = lora_params(arch, r)
    return {"head": head, "lora": lora + head}


# keys of the train section that only LoRA rounds read
LORA_ONLY_KEYS = frozenset(
    {
        "local_epochs",
        "local_steps",
        "batch_size",
        "physical_batch_size",
        "learning_rate",
        "weight_decay",
        "optimizer",
        "schedule",
        "warmup_fraction",
    }
)


def unused_lora_keys(job: JobConfig) -> list[str]:
    """LoRA-only train keys the job sets although every round trains the probe (a job written
    for LoRA that ``train.mode: auto`` turns into a probe under DP): said before round 1."""
    if job.train_mode != "head":
        return []
    return [f"train.{k}" for k in sorted(job.train.model_fields_set & LORA_ONLY_KEYS)]


def describe_plan(
    site: str, plan: PrivacyPlan, trainable: Mapping[str, int]
) -> tuple[list[str], list[str]]:
    """Lines describing ``site``'s plan, and warnings for phases where noise swamps signal."""
    lines = [f"  {site}: {plan.records} training records"]
    warnings: list[str] = []
    for ph in plan.phases:
        lora = "LoRA + head" if trainable.get("head") else "LoRA"  # causal LM, label words
        what = "linear probe (head)" if ph.trains == "head" else lora
        rounds = f"round {ph.first_round}" if ph.rounds == 1 else (
            f"rounds {ph.first_round}-{ph.first_round + ph.rounds - 1}"
        )
        line = (
            f"    {rounds}, {what}: q = {ph.sample_rate:.4g} (expected batch {ph.batch_size}), "
            f"{ph.steps_per_round} steps per round, {ph.total_steps} in all"
        )
        if plan.enabled:
            d = trainable[ph.trains]
            noise = phase_noise(ph, plan.max_grad_norm, d)
            line += (
                f", sigma {ph.noise_multiplier:.3g}; noise on the averaged gradient: std "
                f"{noise.std_per_coordinate:.3g} per coordinate, norm ~{noise.norm:.3g} over "
                f"{d:,} parameters = {noise.ratio:.2f} x the largest clipped signal per step, "
                f"{noise.phase_ratio:.2f} x over the {ph.total_steps} steps"
            )
            if noise.phase_ratio > SWAMPED:
                warnings.append(
                    f"{site}: noise will swamp the signal in {rounds} ({what}): over its "
                    f"{ph.total_steps} steps the noise is {noise.phase_ratio:.2f} times the "
                    f"largest signal they can add up to ({noise.ratio:.1f} times in each "
                    f"step), because the site has {plan.records} records (expected batch "
                    f"{ph.batch_size}, sigma {ph.noise_multiplier:.3g}). The model will barely "
                    "learn there. "
                    "To fix: give the site more records (or merge small sites), raise the "
                    "batch size (train.batch_size, train.probe.batch_size), train fewer "
                    "parameters (train.mode head, or aggregation ffa), or accept a larger "
                    "privacy.target_epsilon."
                )
        lines.append(line)
    return lines, warnings
