"""What a check is (:class:`Check`), what it finds (:class:`Discrepancy`), and the
comparisons every check group shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedslm.privacy.accounting import EPSILON_TOLERANCE
from fedslm.report.model import CheckResult
from fedslm.report.runfiles import RunContext

EXACT = 1e-9  # floats that are the same number written twice (products, sums)


@dataclass(frozen=True)
class Discrepancy:
    """The first thing that does not add up: where, which field, stored vs expected."""

    file: str
    site: str | None
    field: str
    stored: Any = None
    expected: Any = None
    note: str = ""
    expected_label: str = "recomputed"
    # not a wrong figure but a check that cannot conclude (an audit without power): the
    # report shows it as not passed, verify does not fail the run for it
    inconclusive: bool = False

    def __str__(self) -> str:
        where = self.file + (f", site {self.site}" if self.site else "")
        text = f"{where}: field {self.field}"
        if self.stored is not None or self.expected is not None:
            text += f": stored {_fmt(self.stored)}, {self.expected_label} {_fmt(self.expected)}"
        return text + (f" ({self.note})" if self.note else "")


CheckFn = Callable[[RunContext, Sequence[str]], Discrepancy | None]


@dataclass(frozen=True)
class Check:
    """One check over the run's files for the given sites."""

    name: str
    description: str
    fn: CheckFn
    # whether the run has what the check is about (None: every run); a check that does not
    # apply is left out of the report and of verify
    applies: Callable[[RunContext], bool] | None = None

    def applicable(self, ctx: RunContext) -> bool:
        """Whether this check runs on ``ctx``'s run."""
        return self.applies is None or self.applies(ctx)

    def find(self, ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
        """The first discrepancy, or None. A field a check cannot read is a discrepancy too:
        the files were edited (or written by an incompatible fedslm)."""
        try:
            return self.fn(ctx, sites)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return Discrepancy(
                "run files", None, "a field this check reads", note=f"{type(exc).__name__}: {exc}"
            )

    def run(self, ctx: RunContext, sites: Sequence[str]) -> CheckResult:
        """Run it; the result names the first discrepancy, or what was checked."""
        found = self.find(ctx, sites)
        detail = str(found) if found else f"ok ({', '.join(sites) or 'no sites'})"
        inconclusive = found is not None and found.inconclusive
        return CheckResult(
            name=self.name,
            description=self.description,
            passed=found is None,
            detail=f"inconclusive: {detail}" if inconclusive else detail,
            inconclusive=inconclusive,
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return "missing" if v is None else repr(v) if isinstance(v, str) else str(v)


def json_epsilon(v: Any) -> float:
    """An epsilon as JSON holds it: null is infinite (write_json turns inf into null)."""
    return math.inf if v is None else float(v)


def eps_close(stored: Any, recomputed: float, rel: float = EPSILON_TOLERANCE) -> bool:
    """Whether a stored epsilon agrees with a recomputation (infinite only with infinite)."""
    try:
        a = json_epsilon(stored)
    except (TypeError, ValueError):
        return False
    if math.isinf(a) or math.isinf(recomputed):
        return a == recomputed
    return math.isclose(a, recomputed, rel_tol=rel, abs_tol=1e-9)


def same(a: Any, b: Any) -> bool:
    """Whether two stored figures agree exactly (floats up to ``EXACT``: rounding only)."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=EXACT, abs_tol=0.0)
    return a == b


def dp_sites(ctx: RunContext, sites: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """The sites of ``sites`` that trained with DP, with their privacy.json entry."""
    out = []
    for s in sites:
        p = ctx.run.privacy["sites"].get(s)
        if isinstance(p, dict) and p.get("dp_enabled"):
            out.append((s, p))
    return out
