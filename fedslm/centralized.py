"""``fedslm centralized``: the baseline that pools every site's data in one place.

Same model, LoRA, optimizer, privacy settings and training budget as the federated job (the
same number of passes over the data), so the gap between the two is what federation costs.
Runs in-process with the same ``Site`` and ``Coordinator`` code, without Flower.
"""

from __future__ import annotations

import time
from typing import Any

from fedslm.coordinator import Coordinator
from fedslm.data import SiteFiles, read_rows, write_rows
from fedslm.inprocess import build_site, to_report
from fedslm.job import PreparedJob, SiteSetup, make_coordinator, site_ledger
from fedslm.messages import SiteEval
from fedslm.policy import SitePolicy
from fedslm.progress import Reporter
from fedslm.rounds import run_round_sequence
from fedslm.runfolder import record_ledgers
from fedslm.site import Site, SiteUpdate

POOLED = "pooled"


def pooled_job(prepared: PreparedJob) -> PreparedJob:
    """The prepared job with all sites' files concatenated into one ``pooled`` site."""
    job = prepared.job
    if job.train.local_steps is not None:
        # same number of examples seen: K sites' steps become one site's steps
        train = job.train.model_copy(
            update={"local_steps": job.train.local_steps * len(prepared.sites)}
        )
        job = job.model_copy(update={"train": train})
    federation = job.federation.model_copy(update={"sites": [POOLED], "min_sites": None})
    job = job.model_copy(update={"federation": federation})
    d = job.data
    columns = (
        [d.text_column, d.label_column]
        if job.task.type == "classification"
        else [d.prompt_column, d.response_column]
    )
    folder = prepared.site_dir(POOLED) / "data"
    files = {}
    for split in ("train", "eval"):
        rows = [row for s in prepared.sites for row in read_rows(getattr(s.files, split), columns)]
        files[split] = folder / f"{split}.jsonl"
        write_rows(rows, files[split])
    # The pooled data set is a baseline, not a site: no site policy applies, but its DP spend
    # is still recorded in a ledger like any other, kept where the sites' ledgers are.
    setup = SiteSetup(
        SiteFiles(POOLED, files["train"], files["eval"]),
        SitePolicy(),
        site_ledger(SitePolicy(), files["train"], prepared.site_dir(POOLED), prepared.ledgers),
    )
    return PreparedJob(
        job,
        prepared.source,
        prepared.out,
        prepared.job_id,
        [setup],
        prepared.labels,
        prepared.model,
        prepared.ledgers,
    )


class PooledSiteTransport:
    """A round's reply from the one pooled site, for ``run_round_sequence``: it is not a site,
    so nothing passes a policy or an egress check, and each round is evaluated right after
    its aggregation."""

    defers_evaluation = False

    def __init__(self, coordinator: Coordinator, site: Site, reporter: Reporter) -> None:
        self.coordinator, self.site, self.reporter = coordinator, site, reporter
        self.update: SiteUpdate | None = None

    def train(self, round_num: int, evaluate_round: int | None) -> float:
        """The pooled site trains round ``round_num`` on the global adapter."""
        assert evaluate_round is None, "centralized rounds are evaluated at once"
        started = time.perf_counter()

        def on_step(step: int, steps: int, loss: float) -> None:
            self.reporter.step(POOLED, round_num, step, steps, loss)

        self.update = self.site.train_round(round_num, self.coordinator.state, on_step=on_step)
        return started

    def aggregate(self, round_num: int) -> bool:
        """The pooled site's report, to ``Coordinator.aggregate``."""
        assert self.update is not None, "aggregate before train"
        reports = [to_report(self.site, self.update)]
        return self.coordinator.aggregate(round_num, reports, []) is not None

    def evaluate(self, round_num: int) -> None:
        """The pooled site evaluates the global adapter on the pooled held-out split."""
        ev = self.site.evaluate(self.coordinator.state)
        evals = [SiteEval(POOLED, ev.loss, ev.accuracy, ev.examples)]
        self.coordinator.record_evaluation(evals, [])


def run_centralized(prepared: PreparedJob, reporter: Reporter) -> dict[str, Any]:
    """Train on the pooled data for ``federation.rounds`` rounds (``run_round_sequence`` with
    a ``PooledSiteTransport``); write the usual outputs."""
    pooled = pooled_job(prepared)
    setup = pooled.sites[0]
    record_ledgers(prepared.out, {POOLED: setup.ledger})  # for report and verify
    # the pooled baseline is not a site: no policy, but its DP spend is still recorded
    site = build_site(pooled, setup, with_policy=False)
    coordinator = make_coordinator(pooled)
    run_round_sequence(coordinator, PooledSiteTransport(coordinator, site, reporter), reporter)
    return coordinator.finish()


__all__ = ["POOLED", "pooled_job", "run_centralized", "to_report"]
