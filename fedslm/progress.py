"""What a person watching a run sees: rounds, sites, local steps, loss and epsilon so far.

One ``Reporter`` per process. ``quiet`` keeps warnings and errors only, for log files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from fedslm.rounds import RoundRecord


def _num(x: Any, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


class Reporter:
    """Prints progress lines to stderr (stdout stays free for machine-readable output)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)

    def info(self, text: str) -> None:
        """A line of progress."""
        if not self.quiet:
            self.console.print(text, markup=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        """A problem the run survives; shown even when quiet."""
        self.console.print(f"warning: {text}", style="yellow", markup=False, soft_wrap=True)

    def step(self, site: str, round_num: int, step: int, steps: int, loss: float) -> None:
        """A site's local step; printed about five times per round."""
        every = max(1, steps // 5)
        if step == steps or step % every == 0:
            self.info(f"  [{site}] round {round_num} step {step}/{steps} loss {_num(loss)}")

    def round_done(self, rec: RoundRecord, rounds: int) -> None:
        """Summary of a finished round, one line per site."""
        if not rec.aggregated:
            self.warn(f"round {rec.round} not aggregated: {rec.reason}")
        for site, reasons in rec.refusals.items():
            self.warn(f"round {rec.round}: {site} refused: {'; '.join(reasons)}")
        for failure in rec.failures:
            self.warn(f"round {rec.round}: {failure}")
        if self.quiet:
            return
        for site, s in sorted(rec.sites.items()):
            self.info(
                f"  {site}: steps {'-' if s.steps is None else s.steps} "
                f"train loss {_num(s.train_loss)} "
                f"eval loss {_num(s.eval_loss)} acc {_num(s.eval_accuracy, '.3f')} "
                f"eps {_num(s.epsilon, '.3f')} sent {s.bytes_sent or 0:,} B"
            )
        self.info(
            f"round {rec.round}/{rounds}: train loss {_num(rec.train_loss)} "
            f"eval loss {_num(rec.eval_loss)} "
            f"eval acc {_num(rec.eval_accuracy, '.3f')} "
            f"({rec.wall_seconds or 0.0:.1f} s)"
        )


@dataclass(frozen=True)
class Absence:
    """A site that did not take part in a round's training, and why. ``failed``: it broke
    (an error, a timeout, a rejected update); otherwise its policy refused the round."""

    round: int
    site: str
    why: str
    failed: bool

    def describe(self) -> str:
        """One line of the run's summary."""
        return (
            f"round {self.round}: {self.site} {'failed' if self.failed else 'refused'}: {self.why}"
        )


def absences(records: Sequence[dict[str, Any]], roster: Sequence[str]) -> list[Absence]:
    """Every site of ``roster`` that trained nothing in a round of ``records`` (the lines of
    ``metrics.jsonl``), with its refusal or the failures that name it. A failure that names
    no site (a simulated node that timed out) is given to each absent site nobody explains."""
    out = []
    for rec in records:
        took_part = {s for s, v in (rec.get("sites") or {}).items() if "steps" in v}
        refusals = rec.get("refusals") or {}
        failures = [f for f in rec.get("failures") or [] if not f.startswith("evaluate: ")]
        unnamed = [f for f in failures if not any(_names(f, s) for s in roster)]
        for site in roster:
            if site in took_part:
                continue
            if site in refusals:
                out.append(Absence(rec["round"], site, "; ".join(refusals[site]), False))
                continue
            mine = [f for f in failures if _names(f, site)] or unnamed
            why = "; ".join(mine) or "no usable update arrived (see metrics.jsonl)"
            out.append(Absence(rec["round"], site, why, True))
    return out


def _names(text: str, site: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(site)}(?![\w-])", text) is not None
