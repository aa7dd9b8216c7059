"""A whole federated job in one process, without Flower: every site, then the coordinator.

The same ``Site`` and ``Coordinator`` code that Flower connects in simulation and deployment,
called directly in a loop. Sites train one after another, so this is for tests, benchmarks and
debugging, not for speed; ``fedslm simulate`` runs the sites in parallel through Flower.
"""

from __future__ import annotations

from typing import Any

from fedslm.coordinator import Coordinator
from fedslm.job import PreparedJob, SiteSetup, make_coordinator
from fedslm.messages import SiteEval, SiteReport
from fedslm.progress import Reporter
from fedslm.site import Site, SiteRefusal, SiteUpdate, simulated_noise_secret


def build_site(prepared: PreparedJob, setup: SiteSetup, *, with_policy: bool = True) -> Site:
    """The site ``setup`` of ``prepared``, as the simulation's ClientApp builds it (the model is
    loaded).

    Its noise secret is derived from ``job.seed``: a simulated site runs on the coordinator's
    machine, where a secret would hide nothing, and a simulation must be reproducible from its
    config. A real site's secret is random and stays at the site (``fedslm site start``).
    """
    return Site(
        prepared.job,
        setup.name,
        prepared.model,
        prepared.labels,
        setup.files.train,
        setup.files.eval,
        ledger=setup.ledger,
        job_id=prepared.job_id,
        policy=setup.policy if with_policy else None,
        source=prepared.source,
        noise_secret=simulated_noise_secret(prepared.job),
    )


def to_report(site: Site, u: SiteUpdate, bytes_sent: int | None = None) -> SiteReport:
    """A site's update as the coordinator sees it, without a network in between
    (``Site.report``)."""
    return site.report(u, bytes_sent)


def run_in_process(
    prepared: PreparedJob,
    reporter: Reporter | None = None,
    *,
    sites: list[Site] | None = None,
    coordinator: Coordinator | None = None,
) -> dict[str, Any]:
    """Run every round of ``prepared``; write the usual outputs; return the privacy summary.

    ``sites`` reuses already built sites (each loads a model); by default they are built here
    with their policies. ``coordinator`` (default: ``make_coordinator``) is for callers that
    read its final state afterwards (the privacy audit). A refusal is recorded like Flower's
    path records it.
    """
    reporter = reporter or Reporter(quiet=True)
    sites = sites if sites is not None else [build_site(prepared, s) for s in prepared.sites]
    coordinator = coordinator or make_coordinator(prepared)
    rounds = prepared.job.federation.rounds
    for r in range(1, rounds + 1):
        coordinator.start_round(r)
        reports: list[SiteReport] = []
        refusals: dict[str, list[str]] = {}
        for site in sites:

            def on_step(
                step: int, steps: int, loss: float, name: str = site.name, round_num: int = r
            ) -> None:
                reporter.step(name, round_num, step, steps, loss)

            try:
                anchor = coordinator.site_anchor(site.name)
                update = site.train_round(r, coordinator.state, on_step, anchor)
                # what would leave the site is checked and logged, as on the network path
                site.release(r, site.train_payload(update))
            except SiteRefusal as refusal:
                site.release(r, site.refusal_payload(refusal.reasons))
                refusals[site.name] = refusal.reasons
                continue
            reports.append(to_report(site, update))
        coordinator.aggregate(r, reports, [], refusals)
        evals = []
        for site in sites:
            ev = site.evaluate(coordinator.state)
            sent = site.release(r, site.eval_payload(ev))
            withheld = sent.fields.get("withheld")
            if withheld is not None:  # too few evaluation records: no numbers left the site
                evals.append(SiteEval.withheld_by(site.name, withheld))
            else:
                evals.append(SiteEval(site.name, ev.loss, ev.accuracy, ev.examples))
        coordinator.record_evaluation(evals, [])
        reporter.round_done(coordinator.end_round(), rounds)
    return coordinator.finish()
