"""The privacy report's "Empirical check" section: ``audit.json`` of ``fedslm audit``, read
back typed.

A report shows it when the run folder holds an ``audit.json``: an audit folder always does
(it is the audited run's folder); for another run of the same job, copy the audit's
``audit.json`` into the run's folder (it holds aggregate figures only: no canary, no
inclusion bit). The section says whether the audit was of the same job (config fingerprint).
Pure pydantic: no import of ``fedslm.report`` (which imports this module).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedslm.audit import AUDIT_JSON


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmpiricalRun(_Model):
    """One run of the audit: its lower bound and, under DP, the epsilon its ledger claims."""

    dp: bool
    lower_bound: float = Field(description="empirical lower bound on epsilon")
    confidence: float
    guesses: int = Field(description="r: canaries guessed members (the best r scanned)")
    correct: int = Field(description="v: right guesses among them")
    formal_epsilon: float | None = Field(description="null: DP off (the control)")
    accountant: str | None
    delta: float


class EmpiricalCheck(_Model):
    """The result of ``fedslm audit`` on this job."""

    method: str
    site: str = Field(description="the site whose training data held the canaries")
    canaries: int = Field(description="m")
    included: int
    audited: EmpiricalRun
    control: EmpiricalRun
    min_control_epsilon: float
    violation: bool = Field(description="the lower bound exceeds the claimed epsilon")
    has_power: bool = Field(description="the DP-off control reached min_control_epsilon")
    verdict: str
    caveat: str
    same_job: bool | None = Field(
        description="the audit's config fingerprint equals this run's (null: run has none)"
    )


def empirical_check(run_root: Path, config: dict[str, Any] | None) -> EmpiricalCheck | None:
    """The Empirical check of the run in ``run_root`` (None without ``audit.json``).

    ``config`` is the run's validated job config (``job.json``), to say whether the audit was
    of the same job. A malformed file raises ``ValueError`` (the report names the run).
    """
    path = Path(run_root) / AUDIT_JSON
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != "fedslm-audit":
        raise ValueError(f"{path}: not a fedslm audit result")
    same = None
    if config is not None:
        from fedslm.config import JobConfig

        same = JobConfig.model_validate(config).fingerprint() == data["job_fingerprint"]
    keep = set(EmpiricalRun.model_fields)
    return EmpiricalCheck(
        method=data["method"],
        site=data["site"],
        canaries=data["canaries"],
        included=data["included"],
        audited=EmpiricalRun(**{k: v for k, v in data["audited"].items() if k in keep}),
        control=EmpiricalRun(**{k: v for k, v in data["control"].items() if k in keep}),
        min_control_epsilon=data["min_control_epsilon"],
        violation=data["violation"],
        has_power=data["has_power"],
        verdict=data["verdict"],
        caveat=data["caveat"],
        same_job=same,
    )
