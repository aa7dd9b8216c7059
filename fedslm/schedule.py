"""The learning-rate schedule of a whole job: warm-up, then decay, over every round's steps.

A site trains a few hundred steps per round with a fresh optimizer each round. A schedule that
restarted every round would warm up and decay again each time; this one is a pure function of
the job-wide step number (round r's first step is ``(r - 1) * steps_per_round``), so round 2
continues where round 1 stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["linear", "cosine", "constant"]


@dataclass(frozen=True)
class Schedule:
    """Peak ``learning_rate`` over ``total_steps``; the first ``warmup_steps`` rise linearly."""

    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    kind: ScheduleKind = "linear"

    def at(self, step: int) -> float:
        """The learning rate of job-wide step ``step`` (0-based)."""
        return self.learning_rate * lr_factor(step, self.total_steps, self.warmup_steps, self.kind)


def lr_factor(step: int, total: int, warmup: int, kind: ScheduleKind) -> float:
    """Multiplier of the peak learning rate at 0-based ``step`` of ``total``.

    Warm-up: ``(step + 1) / warmup`` (the first step is not wasted at 0). After it, ``linear``
    and ``cosine`` fall from 1 towards 0 at the last step's end; ``constant`` stays at 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
