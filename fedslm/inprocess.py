"""A whole federated job in one process, without Flower: every site, then the coordinator.

The same ``Site`` and ``Coordinator`` code that Flower connects in simulation and deployment,
called directly in a loop. Sites train one after another, so this is for tests, benchmarks and
debugging, not for speed; ``fedslm simulate`` runs the sites in parallel through Flower.
"""

from __future__ import annotations

import time
from typing import Any

from fedslm.coordinator import Coordinator
from fedslm.job import PreparedJob, SiteSetup, make_coordinator
from fedslm.messages import SiteEval, SiteReport
from fedslm.progress import Reporter
from fedslm.rounds import run_round_sequence
from fedslm.site import Site, SiteInputs, SiteUpdate, simulated_noise_secret


def build_site(prepared: PreparedJob, setup: SiteSetup, *, with_policy: bool = True) -> Site:
    """The site ``setup`` of ``prepared``, as the simulation's ClientApp builds it (the model is
    loaded).

    Its noise secret is derived from ``job.seed``: a simulated site runs on the coordinator's
    machine, where a secret would hide nothing, and a simulation must be reproducible from its
    config. A real site's secret is random and stays at the site (``fedslm site start``).
    """
    inputs = SiteInputs(
        setup.name,
        setup.files.train,
        setup.files.eval,
        setup.ledger,
        policy=setup.policy if with_policy else None,
        noise_secret=simulated_noise_secret(prepared.job),
    )
    return Site(
        prepared.job,
        prepared.model,
        prepared.labels,
        inputs,
        job_id=prepared.job_id,
        source=prepared.source,
    )


def to_report(site: Site, u: SiteUpdate, bytes_sent: int | None = None) -> SiteReport:
    """A site's update as the coordinator sees it, without a network in between
    (``Site.report``)."""
    return site.report(u, bytes_sent)


class SiteCallTransport:
    """A round's replies as direct calls of each ``Site``, one site after another, for
    ``run_round_sequence``. What would leave a site is checked and logged by ``Site.release``,
    as on the network path; a refusal is recorded as Flower's path records it. Each round is
    evaluated right after its aggregation (``defers_evaluation`` False)."""

    defers_evaluation = False

    def __init__(self, coordinator: Coordinator, sites: list[Site], reporter: Reporter) -> None:
        self.coordinator, self.sites, self.reporter = coordinator, sites, reporter
        self.reports: list[SiteReport] = []
        self.refusals: dict[str, list[str]] = {}

    def train(self, round_num: int, evaluate_round: int | None) -> float:
        """Every site trains round ``round_num`` on the global adapter."""
        assert evaluate_round is None, "in-process rounds are evaluated at once"
        started = time.perf_counter()
        self.reports, self.refusals = [], {}
        for site in self.sites:
            update = self._train(site, round_num)
            if update is not None:
                self.reports.append(to_report(site, update))
        return started

    def _train(self, site: Site, round_num: int) -> SiteUpdate | None:
        """One site's round, released as on the network path (None: the site refused)."""

        def on_step(step: int, steps: int, loss: float) -> None:
            self.reporter.step(site.name, round_num, step, steps, loss)

        anchor = self.coordinator.site_anchor(site.name)
        answer = site.answer_train(round_num, self.coordinator.state, on_step, anchor)
        if answer.update is None:
            self.refusals[site.name] = answer.reasons
        return answer.update

    def aggregate(self, round_num: int) -> bool:
        """The sites' reports and refusals, to ``Coordinator.aggregate``."""
        state = self.coordinator.aggregate(round_num, self.reports, [], self.refusals)
        return state is not None

    def evaluate(self, round_num: int) -> None:
        """Every site evaluates the global adapter; an evaluation with too few records leaves
        the site as ``withheld``, without numbers."""
        evals = []
        for site in self.sites:
            ev = site.evaluate(self.coordinator.state)
            sent = site.release(round_num, site.eval_payload(ev))
            withheld = sent.fields.get("withheld")
            if withheld is not None:  # too few evaluation records: no numbers left the site
                evals.append(SiteEval.withheld_by(site.name, withheld))
            else:
                evals.append(SiteEval(site.name, ev.loss, ev.accuracy, ev.examples))
        self.coordinator.record_evaluation(evals, [])


def run_job_in_process(
    prepared: PreparedJob,
    reporter: Reporter | None = None,
    *,
    sites: list[Site] | None = None,
    coordinator: Coordinator | None = None,
) -> dict[str, Any]:
    """Run every round of ``prepared`` without Flower (``run_round_sequence`` with a
    ``SiteCallTransport``); write the usual outputs; return the privacy summary.

    ``sites`` reuses already built sites (each loads a model); by default they are built here
    with their policies. ``coordinator`` (default: ``make_coordinator``) is for callers that
    read its final state afterwards (the privacy audit). A round that is not aggregated is
    recorded and the next one starts from the same adapter.
    """
    reporter = reporter or Reporter(quiet=True)
    sites = sites if sites is not None else [build_site(prepared, s) for s in prepared.sites]
    coordinator = coordinator or make_coordinator(prepared)
    run_round_sequence(coordinator, SiteCallTransport(coordinator, sites, reporter), reporter)
    return coordinator.finish()
