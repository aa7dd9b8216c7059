"""The Flower ServerApp: runs a job's rounds with ``FedSLMStrategy``.

The rounds of simulation and deployment are the library's one round sequence
(``fedslm.rounds.run_round_sequence``) over a ``FlowerTransport``: the strategy's four hooks
in Flower's order, as ``Strategy.start`` calls them. The sequence adds what a long-running
federation needs and ``start`` has no place for: starting from a resumed round, and sending a
round again when sites failed (errors, timeouts) before giving up with the reason.

``app`` is the deployed ServerApp (``fedslm coordinator run`` submits it to the SuperLink):
it reads the run folder from the run config. Simulation binds a prepared job directly
(``make_server_app``).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from fedslm.server.strategy import FedSLMStrategy, collect, exchange, quicker_reply_pulls, send
from fedslm.wire.codec import state_to_arrays
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedslm import __version__
from fedslm.coordinator import Coordinator
from fedslm.errors import FederationError
from fedslm.job import PreparedJob, make_coordinator
from fedslm.messages import MANIFEST, QUIET, DeployedJob, TrainInstruction
from fedslm.privacy.anchors import COORDINATOR_ANCHORS_FILE
from fedslm.progress import Reporter
from fedslm.rounds import run_round_sequence


class FlowerTransport:
    """A round's replies as Flower messages, through ``FedSLMStrategy``'s four hooks in
    Flower's order (as ``Strategy.start`` calls them), for ``run_round_sequence``.

    One message per site and round: round r's training message carries round r-1's global
    adapter, which the site evaluates before training on it, and the reply carries both
    (``defers_evaluation``). The last round's adapter is evaluated with a message of its own.
    (Two messages per round, train then evaluate, cost a deployed round one more trip through
    Flower's SuperLink and SuperNodes: about a second here.)
    """

    defers_evaluation = True

    def __init__(
        self,
        grid: Grid,
        strategy: FedSLMStrategy,
        config: ConfigRecord,
        arrays: ArrayRecord,
        timeout_s: float,
    ) -> None:
        self.grid, self.strategy, self.config = grid, strategy, config
        self.arrays = arrays  # the global adapter the next message carries
        self.timeout_s = timeout_s
        self.replies: list[Message] = []

    def train(self, round_num: int, evaluate_round: int | None) -> float:
        """Send round ``round_num``'s training messages and collect the replies (a site that
        does not answer within ``federation.round_timeout_s`` gets an error reply); the
        evaluations of ``evaluate_round`` that ride on them go to ``aggregate_evaluate``."""
        config = _copy(self.config)
        if evaluate_round is not None:
            config[TrainInstruction.EVALUATE_ROUND.name] = evaluate_round
        sent = send(
            self.grid, self.strategy.configure_train(round_num, self.arrays, config, self.grid)
        )
        self.replies = collect(self.grid, sent, self.timeout_s)
        if evaluate_round is not None:
            self.strategy.aggregate_evaluate(evaluate_round, self.replies)
        return sent.at

    def aggregate(self, round_num: int) -> bool:
        """``aggregate_train``; the new global adapter goes out with the next message."""
        new_arrays, _ = self.strategy.aggregate_train(round_num, self.replies)
        if new_arrays is None:
            return False
        self.arrays = new_arrays
        return True

    def evaluate(self, round_num: int) -> None:
        """The last round's evaluation: an evaluate message of its own."""
        messages = self.strategy.configure_evaluate(
            round_num, self.arrays, _copy(self.config), self.grid
        )
        self.strategy.aggregate_evaluate(round_num, exchange(self.grid, messages, self.timeout_s))


def run_flower_rounds(
    grid: Grid,
    strategy: FedSLMStrategy,
    coordinator: Coordinator,
    reporter: Reporter,
    config: ConfigRecord,
    first_round: int = 1,
) -> None:
    """Rounds ``first_round`` .. ``federation.rounds`` over Flower (``run_round_sequence``
    with a ``FlowerTransport``).

    A round that cannot be aggregated because sites failed (errors, timeouts) is sent again up
    to ``federation.round_retries`` times (not under secure aggregation); then, or at once when
    nothing failed that a retry could mend (e.g. every site refused), the run stops with the
    round's reason. The round's record is written either way.
    """
    fed = coordinator.job.federation
    transport = FlowerTransport(
        grid, strategy, config, state_to_arrays(coordinator.state), fed.round_timeout_s
    )
    run_round_sequence(
        coordinator,
        transport,
        reporter,
        first_round=first_round,
        retries=0 if fed.secure_aggregation else fed.round_retries,
        stop_when_not_aggregated=True,
    )


def _copy(config: ConfigRecord) -> ConfigRecord:
    return ConfigRecord(dict(config))


def run_job(grid: Grid, manifest: Path, reporter: Reporter) -> dict:
    """Run every round of the simulated job in ``manifest``; return the privacy summary."""
    prepared = PreparedJob.load(manifest)
    coordinator = make_coordinator(prepared)
    strategy = FedSLMStrategy(coordinator, len(prepared.sites), reporter, job_id=prepared.job_id)
    config = ConfigRecord({MANIFEST.name: str(manifest), QUIET.name: reporter.quiet})
    return _run_to_end(grid, strategy, coordinator, reporter, config, prepared.out)


def _run_to_end(
    grid: Grid,
    strategy: FedSLMStrategy,
    coordinator: Coordinator,
    reporter: Reporter,
    config: ConfigRecord,
    out: Path,
    first_round: int = 1,
) -> dict:
    strategy.summary()
    try:
        run_flower_rounds(grid, strategy, coordinator, reporter, config, first_round)
    finally:
        summary = coordinator.finish()  # the record is written even when the run fails
    if coordinator.aggregated_rounds == 0:
        raise FederationError(
            "no round was aggregated: too few sites returned a usable update in every round; "
            f"the failures are listed in {out / 'metrics.jsonl'}"
        )
    return summary


def make_server_app(manifest: Path, reporter: Reporter) -> ServerApp:
    """A ServerApp bound to one prepared job (simulation passes objects, not config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_job(grid, manifest, reporter)

    return app


def deployed_config(prepared: PreparedJob) -> ConfigRecord:
    """What every message of a deployed job carries: the job itself (each site validates it
    against its own policy), its id, the base model's hash and the coordinator's versions."""
    job = DeployedJob(
        job=json.dumps(prepared.job.model_dump(mode="json"), sort_keys=True),
        job_id=prepared.job_id,
        model_sha256=prepared.model.sha256,
        fedslm_version=__version__,
        flwr_version=version("flwr"),
    )
    return ConfigRecord({**job.to_config(), QUIET.name: False})


def run_deployed(grid: Grid, run_dir: Path, resume: bool, reporter: Reporter) -> dict:
    """Run (or resume) the deployed run in ``run_dir`` on its roster of registered sites."""
    from fedslm.deployment.runs import DeployedRun, write_status

    quicker_reply_pulls()
    run = DeployedRun.load(run_dir)
    prepared = run.prepared
    # every site's last ledger head, kept across the runs of this coordinator
    coordinator = make_coordinator(prepared, run_dir.parent / COORDINATOR_ANCHORS_FILE)
    first = 1
    if resume:
        first = coordinator.resume() + 1
        reporter.info(f"resuming {prepared.job_id} at round {first}")
    fed = prepared.job.federation
    strategy = FedSLMStrategy(
        coordinator,
        len(run.roster),
        reporter,
        connect_timeout_s=fed.connect_timeout_s,
        job_id=prepared.job_id,
        roster={s.node_id: s.name for s in run.roster},
    )
    write_status(run_dir, "running", job_id=prepared.job_id, first_round=first)
    try:
        summary = _run_to_end(
            grid, strategy, coordinator, reporter, deployed_config(prepared), run_dir, first
        )
    except Exception as exc:
        write_status(run_dir, "failed", job_id=prepared.job_id, reason=str(exc))
        raise
    write_status(run_dir, "finished", job_id=prepared.job_id)
    return summary


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployed ServerApp: ``run-dir`` (and ``resume``) come from the run config."""
    run_dir = str(context.run_config.get("run-dir", ""))
    if not run_dir:
        raise FederationError(
            "run-dir is not set in the run config; start deployed jobs with "
            "`fedslm coordinator run JOB.yaml`"
        )
    run_deployed(grid, Path(run_dir), bool(context.run_config.get("resume", False)), Reporter())
