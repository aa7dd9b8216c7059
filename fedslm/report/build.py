"""Every figure of a report, computed from a run folder by one small function each.

Figures are read from the run's files (privacy.json, metrics.jsonl, job.json, the adapter, each
site's data files and ledger) or recomputed with ``fedslm.privacy.accounting``; each epsilon
says which (``EpsilonFigure.source``). Each section is computed in its own module of
``fedslm.report.sections``, each check in ``fedslm.report.checks``; :func:`collect` runs the
checks and assembles one report. The same run read twice gives the same report except
``generated_at`` and ``run.run_dir``, which is what ``fedslm verify`` relies on.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

from fedslm import __version__
from fedslm.audit.report import empirical_check
from fedslm.report.checks import run_checks
from fedslm.report.model import CheckResult, Report, Scope
from fedslm.report.runfiles import ReportInputError, RunContext, load_run
from fedslm.report.sections.egress import egress, failures, policies, refusals
from fedslm.report.sections.fingerprints import fingerprints
from fedslm.report.sections.privacy import privacy_section
from fedslm.report.sections.run import run_info
from fedslm.report.sections.summary import notes, summary, trust_model
from fedslm.report.sections.utility import load_baseline, utility


def now_utc() -> str:
    """The report's timestamp: ``SOURCE_DATE_EPOCH`` if set (reproducible builds), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = _dt.datetime.fromtimestamp(int(epoch), _dt.UTC) if epoch else _dt.datetime.now(_dt.UTC)
    return t.isoformat(timespec="seconds")


def collect(
    run_dir: str | Path,
    *,
    site: str | None = None,
    baselines: Sequence[tuple[str, Path]] = (),
    ctx: RunContext | None = None,
    generated_at: str | None = None,
    check_names: Sequence[str] | None = None,
) -> Report:
    """The report of the run in ``run_dir``, for the federation or for one ``site``.

    ``baselines`` are ``(name, run folder)`` pairs to compare utility against; pass
    :func:`fedslm.report.sections.utility.find_baselines` for the ones under
    ``RUN/baselines/``. ``ctx`` reuses ledgers already read; ``check_names`` limits the
    report's checks to those (verify rebuilds an older report with the checks it was made
    with). Raises ``ReportInputError`` for an unreadable run folder.
    """
    ctx = ctx or RunContext(load_run(run_dir))
    sites = ctx.site_names()
    if site is not None:
        if site not in sites:
            raise ReportInputError(f"{ctx.run.root}: no site {site!r} (sites: {sites})")
        sites = [site]
    checks = run_checks(ctx, sites, check_names)
    try:
        return _report(ctx, site, sites, baselines, checks, generated_at)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        failed = next((c for c in checks if not c.passed), None)
        raise ReportInputError(
            f"{ctx.run.root}: cannot build a report: a run file has a missing or malformed "
            f"field ({type(exc).__name__}: {exc})"
            + (f"; first failed check: {failed.name}: {failed.detail}" if failed else "")
        ) from None


def _report(
    ctx: RunContext,
    site: str | None,
    sites: list[str],
    baselines: Sequence[tuple[str, Path]],
    checks: list[CheckResult],
    generated_at: str | None,
) -> Report:
    privacy = privacy_section(ctx, sites)
    fp = fingerprints(ctx, sites)
    return Report(
        generated_by=f"fedslm {__version__}",
        generated_at=generated_at or now_utc(),
        scope=Scope(level="site", site=site) if site else Scope(level="federation"),
        run=run_info(ctx),
        summary=summary(ctx, sites, privacy, fp, checks),
        privacy=privacy,
        trust_model=trust_model(ctx, privacy),
        fingerprints=fp,
        egress=egress(ctx, sites),
        policies=policies(ctx, sites),
        refusals=refusals(ctx, sites),
        failures=failures(ctx, sites),
        utility=utility(ctx, sites, [load_baseline(n, p, ctx.run, sites) for n, p in baselines]),
        checks=checks,
        notes=notes(ctx),
        empirical_check=empirical_check(ctx.run.root, ctx.run.config),
    )
