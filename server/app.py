"""The Flower ServerApp: runs a prepared job's rounds with ``FedSLMStrategy``."""

from __future__ import annotations

from pathlib import Path

from fedslm.clients.codec import state_to_arrays
from fedslm.server.strategy import FedSLMStrategy
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedslm.errors import FederationError
from fedslm.job import PreparedJob, make_coordinator
from fedslm.progress import Reporter


def run_job(grid: Grid, manifest: Path, reporter: Reporter) -> dict:
    """Run every round of the job in ``manifest`` over ``grid``; return the privacy summary."""
    prepared = PreparedJob.load(manifest)
    job = prepared.job
    coordinator = make_coordinator(prepared)
    strategy = FedSLMStrategy(coordinator, len(prepared.sites), reporter, job_id=prepared.job_id)
    config = ConfigRecord({"manifest": str(manifest), "quiet": reporter.quiet})

    def end_of_round(server_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower also calls this before round 1
            return None
        reporter.round_done(coordinator.end_round(), job.federation.rounds)
        return None

    strategy.start(
        grid=grid,
        initial_arrays=state_to_arrays(coordinator.state),
        num_rounds=job.federation.rounds,
        timeout=job.federation.round_timeout_s,
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=end_of_round,
    )
    summary = coordinator.finish()  # the record is written even when every round failed
    if coordinator.aggregated_rounds == 0:
        raise FederationError(
            "no round was aggregated: too few sites returned a usable update in every round; "
            f"the failures are listed in {prepared.out / 'metrics.jsonl'}"
        )
    return summary


def make_server_app(manifest: Path, reporter: Reporter) -> ServerApp:
    """A ServerApp bound to one prepared job (simulation passes objects, not config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_job(grid, manifest, reporter)

    return app
