"""Which run a report is about: its folder, kind (federated or centralized), job and sites."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from fedslm.report.model import RunInfo
from fedslm.report.runfiles import RunContext, RunFiles

POOLED = "pooled"  # the single site of a `fedslm centralized` run


RunKind = Literal["centralized", "federated"]


def kind_of(sites: Mapping[str, Any]) -> RunKind:
    """``centralized`` for the sites of a ``fedslm centralized`` run (one pooled site), else
    ``federated``."""
    return "centralized" if list(sites) == [POOLED] else "federated"


def run_kind(run: RunFiles) -> RunKind:
    """The kind of ``run`` (``kind_of`` its privacy.json's sites)."""
    return kind_of(run.privacy["sites"])


def run_info(ctx: RunContext) -> RunInfo:
    """Which run this is."""
    run, config = ctx.run, ctx.run.config or {}
    return RunInfo(
        run_dir=str(run.root.resolve()),
        kind=run_kind(run),
        job_id=run.job_id,
        config_source=(run.manifest or {}).get("source"),
        manifest_present=run.manifest is not None,
        rounds_planned=(config.get("federation") or {}).get("rounds"),
        rounds_recorded=len(run.metrics),
        sites=ctx.site_names(),
        incomplete=run.incomplete,
    )
