"""The report's plots, drawn from the report object with matplotlib as inline SVG.

Each plot shows figures that are also in the report's tables; the plot is a reading aid, the
tables are the record. Output is deterministic (fixed hash salt, no date or creator metadata,
text kept as text) so that ``fedslm verify`` can re-render a report and compare it byte for
byte. The SVG is stripped of its XML prologue and namespace declarations (an HTML parser
supplies them), so the page holds no URL, and each plot's ids are prefixed so that several
plots can share one page.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

from fedslm.report.model import Report

# No display, ever: Figure objects render through Agg/SVG canvases without pyplot's state.
matplotlib.use("Agg")

_RC: dict[RcKeyType, Any] = {
    "svg.hashsalt": "fedslm-report",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


def _svg(fig: Figure, prefix: str) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata=_METADATA, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = re.sub(r'id="([^"]+)"', rf'id="{prefix}-\1"', text)
    text = text.replace('href="#', f'href="#{prefix}-').replace("url(#", f"url(#{prefix}-")
    return text.replace("<svg ", f'<svg role="img" aria-label="{prefix}" ', 1)


def _figure(width: float = 7.0, height: float = 3.0) -> Figure:
    with matplotlib.rc_context(_RC):
        return Figure(figsize=(width, height), dpi=72)


def epsilon_plot(report: Report) -> str | None:
    """Each site's job epsilon after each round, against its policy's budgets."""
    sites = [s for s in report.privacy.sites if s.dp_enabled and s.per_round]
    central = report.privacy.central
    if not sites and central is None:
        return None
    fig = _figure()
    with matplotlib.rc_context(_RC):
        ax = fig.add_subplot()
        budgets: dict[tuple[str, float], list[str]] = {}
        for sp in sites:
            pts = [(r.round, r.logged.epsilon) for r in sp.per_round if r.logged]
            pts = [(k, e) for k, e in pts if e is not None]
            acc = sp.epsilon.accountant if sp.epsilon else "prv"
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{sp.site} ({acc.upper()})")
            life = sp.lifetime.spent if sp.lifetime else None
            job_eps = pts[-1][1] if pts else None
            if life and life.epsilon is not None and job_eps and life.epsilon > job_eps * 1.0001:
                # earlier jobs on the same data set: show what the budget is measured against
                ax.plot(
                    [pts[-1][0]],
                    [life.epsilon],
                    marker="x",
                    linestyle="none",
                    label=f"{sp.site} lifetime, all jobs ({life.accountant.upper()})",
                )
            b = sp.lifetime.budget if sp.lifetime else None
            if b is not None:
                budgets.setdefault(("per-job budget", b.per_job), []).append(sp.site)
                budgets.setdefault(("lifetime budget", b.lifetime), []).append(sp.site)
        if central is not None:
            pts = [(r.round, r.logged.epsilon) for r in central.per_round if r.logged]
            pts = [(k, e) for k, e in pts if e is not None]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="s",
                    color="0.3",
                    label=f"site-level, central ({central.epsilon.accountant.upper()})",
                )
        for (what, value), who in sorted(budgets.items(), key=lambda kv: kv[0][1]):
            style = "--" if what.startswith("per-job") else ":"
            label = f"{what} {value:g}" + ("" if len(who) == len(sites) else f" ({', '.join(who)})")
            ax.axhline(value, linestyle=style, color="0.5", linewidth=1, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon spent by this job")
        ax.set_ylim(bottom=0)
        locator = ax.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator)  # matplotlib's default AutoLocator is one
        locator.set_params(integer=True)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.set_title("Privacy spent per round (δ as in the table)")
    return _svg(fig, "plot-epsilon")


def utility_plot(report: Report) -> str | None:
    """Evaluation loss and accuracy per round, with the baselines dashed."""
    rounds = report.utility.rounds
    if not rounds:
        return None
    fig = _figure(7.0, 3.0)
    with matplotlib.rc_context(_RC):
        loss_ax, acc_ax = fig.subplots(1, 2)
        series = [("this run", rounds, "-")]
        series += [(f"baseline {b.name}", b.rounds, "--") for b in report.utility.baselines]
        scoped = report.scope.site
        for label, rs, style in series:
            for ax, key in ((loss_ax, "eval_loss"), (acc_ax, "eval_accuracy")):
                if scoped and label == "this run":
                    pts = [(r.round, getattr(r.sites.get(scoped), key, None)) for r in rs]
                else:
                    pts = [(r.round, getattr(r, key)) for r in rs]
                pts = [(k, v) for k, v in pts if v is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
        where = f"at {scoped}" if scoped else "weighted over sites"
        loss_ax.set_title(f"evaluation loss ({where})")
        acc_ax.set_title(f"evaluation accuracy ({where})")
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("round")
            ax.xaxis.get_major_locator().set_params(integer=True)
        if acc_ax.get_legend_handles_labels()[0]:  # none before any round was evaluated
            acc_ax.legend(loc="best", fontsize=8, frameon=False)
        fig.tight_layout()
    return _svg(fig, "plot-utility")


def bytes_plot(report: Report) -> str | None:
    """Bytes each site sent per round (whole training replies)."""
    rounds = report.egress.rounds
    sites = sorted({s for r in rounds for s in r.sites})
    if not sites:
        return None
    fig = _figure(7.0, 2.6)
    with matplotlib.rc_context(_RC):
        ax = fig.add_subplot()
        width = 0.8 / len(sites)
        for i, s in enumerate(sites):
            xs = [r.round - 0.4 + width * (i + 0.5) for r in rounds if s in r.sites]
            ys = [r.sites[s] / 1000 for r in rounds if s in r.sites]
            ax.bar(xs, ys, width=width, label=s)
        ax.set_xlabel("round")
        ax.set_ylabel("kB sent")
        ax.set_xticks([r.round for r in rounds])
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.set_title("Bytes sent to the coordinator per round")
    return _svg(fig, "plot-bytes")


def all_plots(report: Report) -> dict[str, str]:
    """The report's plots by name (``epsilon``, ``utility``, ``bytes``); absent ones omitted."""
    plots = {
        "epsilon": epsilon_plot(report),
        "utility": utility_plot(report),
        "bytes": bytes_plot(report),
    }
    return {k: v for k, v in plots.items() if v is not None}
