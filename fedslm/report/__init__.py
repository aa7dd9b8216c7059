"""Privacy reports of a run, for privacy officers, and their verification.

``fedslm report RUN`` writes ``report.html`` (one self-contained page) and ``report.json`` (the
same figures, typed: :class:`fedslm.report.model.Report`) for the federation and for each site;
``fedslm verify`` recomputes them. Modules: ``runfiles`` reads a run folder, ``sections``
computes every figure (one module per section), ``checks`` holds the checks (one module per
group, the registry in the package), ``build`` assembles a report, ``plots`` and ``render``
draw the page, ``verify`` compares a report with its run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedslm.artifacts import write_text
from fedslm.report.build import collect, now_utc
from fedslm.report.model import SCHEMA_VERSION, Report, json_schema
from fedslm.report.render import render_html
from fedslm.report.runfiles import ReportInputError, RunContext, load_run
from fedslm.report.sections.utility import find_baselines
from fedslm.report.signing import SITE_KEY_FILE, sign_site_report

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class Written:
    """One report pair that was written."""

    scope: str
    json_path: Path
    html_path: Path
    report: Report


def report_json_text(report: Report) -> str:
    """``report.json``'s exact text (what verify re-reads)."""
    return report.model_dump_json(indent=2) + "\n"


def write_reports(
    run_dir: str | Path,
    out: str | Path | None = None,
    baselines: Sequence[str | Path] = (),
) -> list[Written]:
    """Write the federation's report and one per site; return what was written.

    Reports go to ``out`` (default ``run_dir``): ``report.{html,json}`` and
    ``sites/SITE/report.{html,json}``. ``baselines`` are run folders to compare utility
    against, besides those under ``RUN/baselines/``. Every report is built before the first
    file is written, so an unreadable run leaves nothing behind.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {out}: is a file, not a folder; choose a folder")
    ctx = RunContext(load_run(run_dir))
    pairs = find_baselines(run_dir)
    for b in baselines:
        b = Path(b)
        if not b.is_dir():
            raise ReportInputError(f"{b}: baseline run folder not found")
        name = b.name if b.name not in {n for n, _ in pairs} else f"{b.name}-{len(pairs) + 1}"
        pairs.append((name, b.resolve()))
    stamp = now_utc()
    scopes: list[tuple[str | None, Path]] = [(None, out)]
    scopes += [(s, out / "sites" / s) for s in ctx.site_names()]
    built = [
        (site, folder, collect(run_dir, site=site, baselines=pairs, ctx=ctx, generated_at=stamp))
        for site, folder in scopes
    ]
    written = []
    for site, folder, report in built:
        json_path, html_path = folder / REPORT_JSON, folder / REPORT_HTML
        try:
            write_text(json_path, report_json_text(report))
            write_text(html_path, render_html(report))
        except OSError as exc:
            raise ReportInputError(
                f"{exc.filename or folder}: cannot write the report ({exc.strerror})"
            ) from None
        key = run_dir / "sites" / (site or "") / SITE_KEY_FILE
        if site is not None and key.is_file():
            # the site vouches for its part with its own key (in deployment, at the site)
            sign_site_report(site, json_path, key)
        written.append(Written(site or "federation", json_path, html_path, report))
    return written


__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "SCHEMA_VERSION",
    "Report",
    "ReportInputError",
    "Written",
    "collect",
    "json_schema",
    "render_html",
    "write_reports",
]
