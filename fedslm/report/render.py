"""Rendering a report object as one self-contained HTML page (Jinja2).

The page has its CSS inline and its plots as inline SVG, loads nothing (a Content Security
Policy forbids every fetch), and is a pure function of the report object: the same
``report.json`` renders to the same bytes with the same fedslm and matplotlib versions.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jinja2
from markupsafe import Markup

from fedslm.report.model import (
    ACCOUNTANT_LABELS,
    EpsilonFigure,
    PolicyInfo,
    Report,
    epsilon_text,
)
from fedslm.report.plots import all_plots


def fmt_eps(f: EpsilonFigure | None, digits: int = 4) -> Markup | str:
    """An epsilon as the page shows it, rounded up, always with its accountant (report.json
    has every digit)."""
    if f is None:
        return "—"
    value = epsilon_text(f.epsilon, digits)
    return Markup('{} <span class="acc">{}</span>').format(value, ACCOUNTANT_LABELS[f.accountant])


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number for a table cell; integers with thousands separators, floats to ``digits``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.{digits}g}"
    return str(v)


def fmt_value(v: Any) -> str:
    """A policy or config value: scalars as they are, lists and mappings as compact JSON."""
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return fmt_num(v)


def group_policies(policies: list[PolicyInfo]) -> list[tuple[list[str], PolicyInfo]]:
    """Sites with identical policies (and sources) together, in first-seen order."""
    groups: dict[str, tuple[list[str], PolicyInfo]] = {}
    for p in policies:
        key = json.dumps([p.source, p.policy], sort_keys=True)
        groups.setdefault(key, ([], p))[0].append(p.site)
    return list(groups.values())


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fedslm.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(eps=fmt_eps, num=fmt_num, value=fmt_value, group_policies=group_policies)
    return env


def render_html(report: Report) -> str:
    """The report as a complete HTML document."""
    template = _environment().get_template("report.html.j2")
    plots = {k: Markup(v) for k, v in all_plots(report).items()}
    return template.render(r=report, plots=plots, labels=ACCOUNTANT_LABELS)


def render_page(template: str, **context: Any) -> str:
    """Another report page (a deployed site's report, a federation's, a governance summary)
    from ``templates/TEMPLATE``, with the same filters and style as the run report."""
    return _environment().get_template(template).render(labels=ACCOUNTANT_LABELS, **context)
