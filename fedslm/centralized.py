"""``fedslm centralized``: the baseline that pools every site's data in one place.

Same model, LoRA, optimizer, privacy settings and training budget as the federated job (the
same number of passes over the data), so the gap between the two is what federation costs.
Runs in-process with the same ``Site`` and ``Coordinator`` code, without Flower.
"""

from __future__ import annotations

from typing import Any

from fedslm.data import SiteFiles, read_rows, write_rows
from fedslm.inprocess import build_site, to_report
from fedslm.job import PreparedJob, SiteSetup, make_coordinator, site_ledger
from fedslm.messages import SiteEval
from fedslm.policy import SitePolicy
from fedslm.progress import Reporter
from fedslm.runfolder import record_ledgers

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


def run_centralized(prepared: PreparedJob, reporter: Reporter) -> dict[str, Any]:
    """Train on the pooled data for ``federation.rounds`` rounds; write the usual outputs."""
    pooled = pooled_job(prepared)
    setup = pooled.sites[0]
    record_ledgers(prepared.out, {POOLED: setup.ledger})  # for report and verify
    # the pooled baseline is not a site: no policy, but its DP spend is still recorded
    site = build_site(pooled, setup, with_policy=False)
    coordinator = make_coordinator(pooled)
    rounds = pooled.job.federation.rounds
    for r in range(1, rounds + 1):
        coordinator.start_round(r)
        update = site.train_round(
            r,
            coordinator.state,
            on_step=lambda step, steps, loss, r=r: reporter.step(POOLED, r, step, steps, loss),
        )
        coordinator.aggregate(r, [to_report(site, update)], [])
        ev = site.evaluate(coordinator.state)
        coordinator.record_evaluation([SiteEval(POOLED, ev.loss, ev.accuracy, ev.examples)], [])
        reporter.round_done(coordinator.end_round(), rounds)
    return coordinator.finish()


__all__ = ["POOLED", "pooled_job", "run_centralized", "to_report"]
