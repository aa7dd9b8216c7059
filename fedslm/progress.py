"""What a person watching a run sees: rounds, sites, local steps, loss and epsilon so far.

One ``Reporter`` per process. ``quiet`` keeps warnings and errors only, for log files.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console


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

    def round_done(self, rec: dict[str, Any], rounds: int) -> None:
        """Summary of a finished round, one line per site."""
        if not rec.get("aggregated", False):
            self.warn(f"round {rec['round']} not aggregated: {rec.get('reason')}")
        for site, reasons in rec.get("refusals", {}).items():
            self.warn(f"round {rec['round']}: {site} refused: {'; '.join(reasons)}")
        for failure in rec.get("failures", []):
            self.warn(f"round {rec['round']}: {failure}")
        if self.quiet:
            return
        for site, s in sorted(rec["sites"].items()):
            self.info(
                f"  {site}: steps {s.get('steps', '-')} train loss {_num(s.get('train_loss'))} "
                f"eval loss {_num(s.get('eval_loss'))} acc {_num(s.get('eval_accuracy'), '.3f')} "
                f"eps {_num(s.get('epsilon'), '.3f')} sent {s.get('bytes_sent', 0):,} B"
            )
        self.info(
            f"round {rec['round']}/{rounds}: train loss {_num(rec.get('train_loss'))} "
            f"eval loss {_num(rec.get('eval_loss'))} "
            f"eval acc {_num(rec.get('eval_accuracy'), '.3f')} "
            f"({rec['wall_seconds']:.1f} s)"
        )
