"""The report's Utility section: per-round metrics and the baselines compared against."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedslm.report.model import Baseline, EpsilonFigure, RoundUtility, SiteRoundUtility, Utility
from fedslm.report.runfiles import (
    BASELINES_DIR,
    METRICS_FILE,
    PRIVACY_FILE,
    RunContext,
    RunFiles,
    read_json,
    read_metrics,
)
from fedslm.report.sections.privacy import figure
from fedslm.report.sections.run import POOLED, RunKind, kind_of


def round_utility(rec: dict[str, Any], sites: Sequence[str]) -> RoundUtility:
    """One metrics.jsonl record as loss and accuracy, per site restricted to ``sites``."""
    fields = set(SiteRoundUtility.model_fields)
    return RoundUtility(
        round=rec["round"],
        aggregated=rec.get("aggregated"),
        reason=rec.get("reason"),
        train_loss=rec.get("train_loss"),
        eval_loss=rec.get("eval_loss"),
        eval_accuracy=rec.get("eval_accuracy"),
        sites={
            s: SiteRoundUtility(**{k: v for k, v in (m or {}).items() if k in fields})
            for s, m in (rec.get("sites") or {}).items()
            if s in sites
        },
    )


def find_baselines(run_dir: str | Path) -> list[tuple[str, Path]]:
    """``RUN/baselines/NAME/`` folders that hold a metrics.jsonl, by name, as paths relative to
    the run folder (``load_baseline`` reads a relative path from there, so a run named by a
    relative path must not be joined to itself)."""
    folder = Path(run_dir) / BASELINES_DIR
    if not folder.is_dir():
        return []
    return [
        (d.name, Path(BASELINES_DIR) / d.name)
        for d in sorted(folder.iterdir())
        if (d / METRICS_FILE).is_file()
    ]


def load_baseline(name: str, path: Path, run: RunFiles, sites: Sequence[str]) -> Baseline:
    """A baseline run's loss and accuracy per round, and its privacy if it has privacy.json."""
    path = Path(path)
    where = path if path.is_absolute() else run.root / path
    metrics = read_metrics(where / METRICS_FILE)
    privacy = read_json(where / PRIVACY_FILE) if (where / PRIVACY_FILE).is_file() else None
    eps: dict[str, EpsilonFigure] = {}
    dp = None
    kind: RunKind = "federated"
    if privacy is not None:
        bsites = privacy.get("sites") or {}
        kind = kind_of(bsites)
        dp = any(p.get("dp_enabled") for p in bsites.values())
        for s, p in bsites.items():
            if p.get("dp_enabled"):
                eps[s] = figure(
                    p.get("epsilon"),
                    p["delta"],
                    p["accountant"],
                    f"baseline {name}: {PRIVACY_FILE} sites.{s}.epsilon",
                )
    shown = [*sites, POOLED]
    return Baseline(
        name=name,
        path=run.rel(where),
        kind=kind,
        dp_enabled=dp,
        epsilons=eps,
        rounds=[round_utility(r, shown) for r in metrics],
    )


def utility(ctx: RunContext, sites: Sequence[str], baselines: list[Baseline]) -> Utility:
    """Loss and accuracy per round, and the baselines."""
    return Utility(
        note="Evaluation loss and accuracy of each round's global adapter on each site's "
        "held-out records (weighted by their number), as the sites reported them to the "
        "coordinator. These figures are not protected by DP.",
        rounds=[round_utility(r, sites) for r in ctx.run.metrics],
        baselines=baselines,
    )
