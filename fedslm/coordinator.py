"""The coordinator's side of a job, without Flower: aggregate each round, keep the record.

The Flower strategy in ``fedslm.server`` decodes messages into ``SiteReport`` objects
(``fedslm.messages``) and hands them here; everything that is decided or written about a
round happens in this module.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedslm.aggregation import weighted_mean
from fedslm.artifacts import (
    append_jsonl,
    jsonl_line,
    library_versions,
    write_json,
    write_text,
    write_torch,
)
from fedslm.config import JobConfig
from fedslm.errors import FederationError
from fedslm.messages import SiteEval, SiteReport
from fedslm.models.adapter import AdapterState, export_adapter
from fedslm.privacy.accounting import (
    ACCOUNTANT_NAMES,
    EPSILON_TOLERANCE,
    Segment,
    calibrate_noise,
    epsilon,
    gaussian_epsilon,
)
from fedslm.privacy.anchors import Anchor
from fedslm.privacy.central import WEIGHTING_TEXT, noised_mean_update, site_weight
from fedslm.robust import clip_update, coordinate_median, trimmed_mean
from fedslm.rounds import RoundRecord
from fedslm.secagg.adapter import mean_state
from fedslm.secagg.messages import SecAggResult
from fedslm.server_opt import make_server_optimizer

RESUME_STATE = "coordinator_state.pt"


@dataclass(frozen=True)
class SecureDropout:
    """A site that trained but left secure aggregation: the stage it did not answer (the
    protocol's ``share-keys``, ``masked-input`` or ``unmask``; ``advertise-keys`` for an
    unusable key advert) and why (an error, a timeout, its own refusal, a malformed reply)."""

    site: str
    stage: str
    reason: str

    def describe(self) -> str:
        """One line for the round's ``failures``."""
        where = f"secure aggregation at stage {self.stage!r}"
        return f"{self.site} dropped out of {where}: {self.reason}"


@dataclass
class _SitePrivacy:
    segments: list[Segment] = field(default_factory=list)
    reported_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    max_grad_norm: float | None = None
    lifetime_epsilon: float | None = None
    ledger_head: str | None = None
    ledger_seq: int | None = None
    records: int = 0
    rounds: int = 0
    refusals: list[str] = field(default_factory=list)


class Coordinator:
    """Holds the global adapter and writes ``metrics.jsonl``, checkpoints, ``adapter/`` and
    ``privacy.json`` under ``out_dir``."""

    def __init__(
        self,
        job: JobConfig,
        out_dir: Path,
        export_model: torch.nn.Module,
        initial_state: AdapterState,
        metadata: dict[str, Any],
        anchors_file: Path | None = None,
    ) -> None:
        self.job = job
        self.out = out_dir
        self.model = export_model
        self.state = initial_state
        self.metadata = metadata
        self.privacy: dict[str, _SitePrivacy] = {}
        self.aggregated_rounds = 0
        self.record: RoundRecord | None = None  # the current round, as it will be written
        # (site, round) pairs already accounted: a retried round whose sites replay the same
        # release must not count their spend twice
        self._accounted: set[tuple[str, int]] = set()
        self._aggregated_at: float | None = None  # when the round in hand was aggregated
        self._counted_until: float | None = None  # the end of the last round's wall time
        self._saved_round: int | None = None  # the round whose metrics line is on disk
        central = job.privacy.central
        self.central_sigma: float | None = None
        if central.enabled:
            self.central_sigma = central.noise_multiplier or calibrate_noise(
                central.target_epsilon or 0.0,
                central.delta,
                1.0,
                job.federation.rounds,
                job.privacy.accountant,
            )
        # Central noise must be unpredictable to whoever sees the released adapter, so it is
        # not derived from the job seed. torch's generator is not a CSPRNG (see caveats).
        self._noise = torch.Generator().manual_seed(secrets.randbits(63))
        server = job.federation.server_optimizer
        # fedprox is FedAvg at the coordinator; its proximal step happens at the sites
        kind = "fedavg" if server.name == "fedprox" else server.name
        self.server_optimizer = make_server_optimizer(kind, **server.hyperparameters())
        # every site's last ledger head from earlier runs (deployed: one file for all runs)
        self.anchors_file = anchors_file
        self.anchors = read_site_anchors(anchors_file)

    # -- per round --------------------------------------------------------------------------

    def _round(self) -> RoundRecord:
        """The round in hand (``start_round`` began it, or ``resume`` read it back)."""
        if self.record is None:
            raise FederationError("the coordinator has no round in hand: call start_round first")
        return self.record

    def start_round(self, round_num: int, started: float | None = None) -> None:
        """Start a round's record; ``started`` (``time.perf_counter()``, default now) is when
        its training messages were sent."""
        self.record = RoundRecord(round_num)
        self._aggregated_at = None
        if self._counted_until is None:  # the first round of this process starts the count
            self._counted_until = time.perf_counter() if started is None else started

    def aggregate(
        self,
        round_num: int,
        reports: list[SiteReport],
        failures: list[str],
        refusals: dict[str, list[str]] | None = None,
    ) -> AdapterState | None:
        """Check each update, then FedAvg them weighted by training records.

        ``refusals`` are sites whose policy refused the round (they trained nothing). A round
        with fewer than ``federation.min_sites`` good updates is not aggregated: the global
        adapter stays as it was and the reason is recorded. Returns the new state or None.
        """
        rec = self._begin_aggregation(round_num, failures, refusals)
        # in site order, not reply order: a float sum depends on its order, and the next
        # round's noise seeds on the adapter's bytes, so a rerun must sum the same way
        reports = [r for r in sorted(reports, key=lambda r: r.site) if self._anchored(r)]
        fed = self.job.federation
        screening = fed.rule.screen(
            self.state,
            [(r.site, r.state) for r in reports],
            factor=fed.robust.outlier_factor or math.inf,
        )
        rec.failures.extend(f"update rejected: {reason}" for _, reason in screening.rejected)
        accepted = {site for site, _ in screening.accepted}
        good: list[SiteReport] = []
        for r in reports:
            if r.site not in accepted:
                continue
            good.append(r)
            self._account(r, round_num)
            rec.sites[r.site] = _site_record(r) | {"update_norm": screening.norms.get(r.site)}
        needed = self.job.federation.required_sites
        rec.train_loss = weighted_mean((r.train_loss, r.num_examples) for r in good)
        rec.bytes_sent = {r.site: r.bytes_sent for r in good}
        if len(good) < needed:
            asked = len(reports) + len(failures) + len(rec.refusals)
            rec.reason = (
                f"only {len(good)} of {asked} sites returned a usable update "
                f"({len(rec.refusals)} refused); federation.min_sites is {needed}"
            )
            return None
        if self.central_sigma is None:
            return self._apply(self._combine(good))
        return self._apply(self._noised_aggregate(good))

    def aggregate_secure(
        self,
        round_num: int,
        reports: list[SiteReport],
        failures: list[str],
        refusals: dict[str, list[str]] | None,
        result: SecAggResult | None,
        survivors: list[str],
        protocol_failure: str | None = None,
        dropouts: Sequence[SecureDropout] = (),
        seconds: Mapping[str, float] | None = None,
    ) -> AdapterState | None:
        """Record a secure-aggregation round and apply its unmasked sum.

        ``reports`` carry each site's metrics and DP fields but no tensors (``state`` is
        empty): the coordinator saw only ``result``, the records-weighted sum of the updates of
        ``survivors`` (the site names whose masked input is in the sum). Nothing can be
        screened; the sites that took part are accounted like ``aggregate`` does. ``failures``
        are training replies that failed; ``dropouts`` the sites that trained and then left the
        protocol (each listed once, in ``failures`` and in ``secure_aggregation.dropouts``).
        ``seconds`` is the wall time of the protocol after training (``protocol``) and of each
        of its message exchanges, kept as ``secure_aggregation.seconds``. A round whose
        protocol failed (``result`` None, ``protocol_failure`` says why) or with fewer than
        ``federation.min_sites`` survivors keeps the previous global adapter.
        """
        rec = self._begin_aggregation(round_num, failures, refusals)
        rec.failures.extend(d.describe() for d in dropouts)
        rec.secure_aggregation = {
            "survivors": sorted(survivors),
            "dropouts": [{"site": d.site, "stage": d.stage, "reason": d.reason} for d in dropouts],
            "total_weight": result.total_weight if result is not None else None,
            "sum_error_bound": result.sum_error_bound if result is not None else None,
            "seconds": dict(seconds or {}),
        }
        # every site that trained spent privacy, whether or not its input reached the sum
        good = [r for r in reports if r.site in set(survivors)] if result is not None else []
        for r in reports:
            # a masked input cannot be taken out of the sum: its spend counts all the same,
            # but its head does not replace the anchored one
            anchored = self._anchored(r, "; its masked input is in the sum all the same")
            self._account(r, round_num, anchor=anchored)
            rec.sites[r.site] = _site_record(r) | {
                "in_secure_sum": r.site in set(survivors) and result is not None
            }
        needed = self.job.federation.required_sites
        rec.train_loss = weighted_mean((r.train_loss, r.num_examples) for r in good)
        rec.bytes_sent = {r.site: r.bytes_sent for r in reports}
        if result is None or len(survivors) < needed:
            asked = len(reports) + len(failures) + len(rec.refusals)
            rec.reason = protocol_failure or (
                f"only {len(survivors)} of {asked} sites completed secure aggregation "
                f"({len(rec.refusals)} refused); federation.min_sites is {needed}"
            )
            return None
        return self._apply(mean_state(self.state, result))

    def _apply(self, aggregated: AdapterState) -> AdapterState:
        """Move the global adapter to ``aggregated`` through the server optimizer."""
        self.state = self.server_optimizer.step(self.state, aggregated)
        self.aggregated_rounds += 1
        self._round().aggregated = True
        self._aggregated_at = time.perf_counter()
        return self.state

    def _begin_aggregation(
        self, round_num: int, failures: list[str], refusals: dict[str, list[str]] | None
    ) -> RoundRecord:
        """Start the round's record with its failures and refusals (kept per site too); it
        says not aggregated until ``_apply`` moves the global adapter."""
        rec = self._round()
        rec.aggregated = False
        rec.failures = list(failures)
        rec.refusals = dict(refusals or {})
        for site, reasons in rec.refusals.items():
            self.privacy.setdefault(site, _SitePrivacy()).refusals.append(
                f"round {round_num}: {'; '.join(reasons)}"
            )
        return rec

    def _combine(self, good: list[SiteReport]) -> AdapterState:
        """The aggregation rule of ``federation.aggregation`` and ``federation.robust``."""
        fed = self.job.federation
        states = [r.state for r in good]
        bound = fed.robust.max_update_norm
        if bound is not None:
            # bound each site's influence: global + clip(state - global)
            states = [self._bounded(s, bound) for s in states]
        weights = [float(r.num_examples) for r in good]
        if fed.robust.rule == "median":
            return coordinate_median(states)
        if fed.robust.rule == "trimmed-mean":
            return trimmed_mean(states, fed.robust.trim_fraction)
        lora = self.job.lora
        combined = fed.rule.combine(states, weights, rank=lora.r, alpha=lora.alpha)
        self._round().rule.update(combined.record)
        return combined.state

    def _bounded(self, state: AdapterState, bound: float) -> AdapterState:
        delta = {k: v - self.state[k] for k, v in state.items()}
        clipped, _ = clip_update(delta, bound)
        return {k: self.state[k] + v for k, v in clipped.items()}

    def _noised_aggregate(self, good: list[SiteReport]) -> AdapterState:
        c = self.job.privacy.central
        assert self.central_sigma is not None and c.clip_norm is not None
        roster = len(self.job.federation.site_names)
        result = noised_mean_update(
            self.state,
            ((r.state, site_weight(c.weighting, r.num_examples, c.records_cap)) for r in good),
            clip_norm=c.clip_norm,
            noise_multiplier=self.central_sigma,
            denominator=roster,
            generator=self._noise,
        )
        self._round().central_dp = {
            "sites": result.sites,
            "clipped": result.clipped,
            "noise_std_of_mean": result.noise_std / roster,
        }
        return result.state

    def record_evaluation(self, evals: list[SiteEval], failures: list[str]) -> dict[str, float]:
        """Fold the sites' evaluations of the global adapter into this round's record."""
        rec = self._round()
        for e in evals:
            site = rec.sites.setdefault(e.site, {})
            if e.withheld is not None:
                site["eval_withheld"] = e.withheld
            else:
                site.update(
                    eval_loss=e.loss, eval_accuracy=e.accuracy, eval_examples=e.num_examples
                )
        rec.failures.extend(f"evaluate: {f}" for f in failures)
        shown = [e for e in evals if e.withheld is None]
        rec.eval_loss = weighted_mean((e.loss, e.num_examples) for e in shown)
        rec.eval_accuracy = weighted_mean((e.accuracy, e.num_examples) for e in shown)
        rec.evaluation_in = True
        figures = {"eval_loss": rec.eval_loss, "eval_accuracy": rec.eval_accuracy}
        return {k: v for k, v in figures.items() if v is not None}

    def save_round(self) -> None:
        """Put the aggregated round in hand on disk now: its checkpoint, its line of
        ``metrics.jsonl`` (evaluation pending) and a ``privacy.json`` that says the run is
        incomplete. Flower's round loop evaluates a round with the next round's messages, so
        without this a run killed in round r+1 would leave nothing of round r. ``end_round``
        later completes the line with the evaluation."""
        rec = self._round()
        assert rec.aggregated, "save_round of a round that was not aggregated"
        assert self._counted_until is not None, "save_round before start_round"
        # provisional: end_round recounts the last round up to its own evaluation
        rec.wall_seconds = (self._aggregated_at or time.perf_counter()) - self._counted_until
        rec.evaluated = False
        self._write_round(rec)
        write_json(self.out / "privacy.json", self.privacy_summary())

    def end_round(self) -> RoundRecord:
        """Write this round's checkpoint and its line of ``metrics.jsonl``; return the round.
        A round that was not aggregated trained nothing new: it gets its line, no checkpoint."""
        rec = self._round()
        # The round's share of the run's wall time: from the previous round's aggregation (the
        # first round in this process: from its start) to its own. Each round's messages carry
        # the previous round's evaluation, so that is where evaluating is counted; the last
        # round (or one that failed) counts up to now, its own evaluation included.
        last = rec.round >= self.job.federation.rounds or not rec.aggregated
        until = time.perf_counter() if last or self._aggregated_at is None else self._aggregated_at
        if self._counted_until is not None:
            rec.wall_seconds, self._counted_until = until - self._counted_until, until
        else:  # a round resumed for its evaluation: its time was counted before the crash
            assert rec.evaluated is False, "end_round before start_round"
        rec.evaluated = True
        self._write_round(rec)
        return rec

    def _write_round(self, rec: RoundRecord) -> None:
        """The round's checkpoint (once, when it was aggregated), then its metrics line: added,
        or replacing the line ``save_round`` wrote for it."""
        rec.finished_at = round(time.time(), 3)  # when the round was recorded (Unix time)
        rec.epsilon = {s: p.reported_epsilon for s, p in self.privacy.items()}
        if self.central_sigma is not None:
            rec.central_epsilon = self._central_epsilon(self.job.privacy.accountant)
        metrics = self.out / "metrics.jsonl"
        if rec.aggregated and self._saved_round != rec.round:
            checkpoint = self.out / "checkpoints" / f"round-{rec.round}"
            meta = self.metadata | {"round": rec.round}
            export_adapter(self.model, self.state, checkpoint, meta)
            # a resumed run continues the server optimizer exactly; the metrics line written
            # last is what marks the round (and its checkpoint) complete
            write_torch(checkpoint / "server_optimizer.pt", self.server_optimizer.state_dict())
            write_torch(checkpoint / RESUME_STATE, self._resume_state())
        if self._saved_round == rec.round:
            lines = _complete_lines(metrics)
            if lines and lines[-1].get("round") == rec.round:
                lines[-1] = rec.to_dict()
                write_text(metrics, "".join(jsonl_line(r) for r in lines))
                self.keep_anchors()
                return
        append_jsonl(metrics, rec.to_dict())
        self._saved_round = rec.round
        self.keep_anchors()

    def keep_anchors(self) -> None:
        """Write every site's last ledger head to ``anchors_file`` (if any), for later runs.

        Merged with the file as it is now: another run of the same coordinator may have
        anchored a later head of a site meanwhile, and the later one is kept.
        """
        if self.anchors_file is None:
            return
        merged = read_site_anchors(self.anchors_file)
        for site, head in self.anchors.items():
            if site not in merged or (head.seq or 0) >= (merged[site].seq or 0):
                merged[site] = head
        write_json(
            self.anchors_file,
            {s: {"seq": a.seq, "hash": a.hash, "where": a.source} for s, a in merged.items()},
        )

    def _anchored(self, r: SiteReport, consequence: str = "") -> bool:
        """Whether ``r``'s ledger head can extend the site's last anchored head; if not, the
        conflict is recorded as a failure and a refusal of the site, and its update unused."""
        conflict = head_conflict(self._last_head(r.site), r.ledger_seq, r.ledger_head)
        if conflict is None:
            return True
        reason = f"{r.site}: {conflict}{consequence}"
        rec = self._round()
        rec.failures.append(f"update rejected: {reason}")
        self.privacy.setdefault(r.site, _SitePrivacy()).refusals.append(
            f"round {rec.round}: {reason}"
        )
        return False

    def site_anchor(self, site: str) -> Anchor | None:
        """The site's last anchored head, which its next train message carries: the site
        checks that its ledger still extends it before it trains (``Site.refusal``), which
        catches a ledger rewritten and then padded past the anchored seq, whose head alone
        ``head_conflict`` cannot tell from an honest one."""
        head = self._last_head(site)
        if head is None:
            return None
        return Anchor(head.seq, head.hash, f"the coordinator's record ({head.source})")

    def _last_head(self, site: str) -> Anchor | None:
        """The site's last anchored head: this run's latest, else the one of earlier runs."""
        p = self.privacy.get(site)
        if p is not None and p.ledger_head and p.ledger_seq is not None:
            return Anchor(p.ledger_seq, p.ledger_head, "an earlier round of this run")
        return self.anchors.get(site)

    def _resume_state(self) -> dict[str, Any]:
        """What ``resume`` needs beyond the exported adapter: the exact float32 global state,
        the per-site privacy record, and the central noise generator (coordinator-private:
        whoever holds it could predict the next round's noise)."""
        return {
            "round": self._round().round,
            "state": {k: v.detach().clone() for k, v in self.state.items()},
            "aggregated_rounds": self.aggregated_rounds,
            "privacy": {name: _privacy_to_dict(p) for name, p in self.privacy.items()},
            "accounted": sorted([list(x) for x in self._accounted]),
            "noise": self._noise.get_state(),
        }

    def resume(self) -> int:
        """Continue from the last completed round in ``out_dir``; return its number (0: none).

        A round is complete when its line is in ``metrics.jsonl`` (written after its
        checkpoint) and says it was aggregated. The global adapter, server optimizer state,
        per-site privacy record and central noise generator are restored; the interrupted
        round is run again from the same global adapter, so a site asked again replays what it
        released instead of spending.
        """
        metrics = self.out / "metrics.jsonl"
        # a round recorded as not aggregated is where a failed run stopped: run it again
        done = [r for r in _complete_lines(metrics) if r.get("aggregated")]
        if not done:
            return 0
        last = int(done[-1]["round"])
        checkpoint = self.out / "checkpoints" / f"round-{last}"
        try:
            saved = torch.load(checkpoint / RESUME_STATE, weights_only=True)
            optimizer = torch.load(checkpoint / "server_optimizer.pt", weights_only=True)
        except FileNotFoundError as exc:
            raise FederationError(
                f"{checkpoint}: round {last} is complete in metrics.jsonl but its checkpoint "
                f"is missing ({exc.filename}); the run cannot be resumed"
            ) from None
        if int(saved["round"]) != last:
            raise FederationError(f"{checkpoint}: holds round {saved['round']}, expected {last}")
        self.state = dict(saved["state"])
        self.server_optimizer.load_state_dict(optimizer)
        self.aggregated_rounds = int(saved["aggregated_rounds"])
        self.privacy = {n: _privacy_from_dict(d) for n, d in saved["privacy"].items()}
        self._accounted = {(str(s), int(r)) for s, r in saved["accounted"]}
        self._noise.set_state(saved["noise"])
        if done[-1].get("evaluated") is False:
            # killed before the round's evaluation came back: its line is completed by the
            # evaluation that rides on the next round's messages (``pending_evaluation``)
            self.record, self._saved_round = RoundRecord.from_dict(done[-1]), last
        return last

    @property
    def pending_evaluation(self) -> int | None:
        """The round in hand whose line waits for its evaluation (after ``resume``), else
        None."""
        rec = self.record
        return rec.round if rec is not None and rec.evaluated is False else None

    # -- end of job ---------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Export the final adapter (only when a round trained one: an untrained adapter
        must not pass for a result) and write ``privacy.json``; return the privacy summary."""
        if self.aggregated_rounds:
            export_adapter(self.model, self.state, self.out / "adapter", self.metadata)
        summary = self.privacy_summary(finished=True)
        write_json(self.out / "privacy.json", summary)
        return summary

    def privacy_summary(self, finished: bool = False) -> dict[str, Any]:
        """Per site: epsilon as the site reported it, and recomputed here from its segments;
        and how far the run got (``run``; ``finished``: the run has stopped)."""
        sites: dict[str, Any] = {}
        for name, p in sorted(self.privacy.items()):
            entry: dict[str, Any] = {
                "records": p.records,
                "rounds": p.rounds,
                "dp_enabled": bool(p.segments),
                "refusals": p.refusals,
            }
            if p.segments and p.delta is not None:
                pld = epsilon(p.segments, p.delta, "pld")
                rdp = epsilon(p.segments, p.delta, "rdp")
                reported = p.reported_epsilon
                ok = (
                    reported is not None
                    and math.isfinite(pld)
                    and abs(reported - pld) <= EPSILON_TOLERANCE * max(pld, 1e-9)
                )
                seg0 = p.segments[0]
                entry.update(
                    epsilon=reported,
                    accountant=p.accountant,
                    accountant_detail=ACCOUNTANT_NAMES.get(p.accountant or "", p.accountant),
                    epsilon_recomputed_pld=pld,
                    epsilon_rdp=rdp,
                    epsilon_check="ok" if ok else "MISMATCH",
                    delta=p.delta,
                    noise_multiplier=seg0.sigma,
                    max_grad_norm=p.max_grad_norm,
                    sample_rate=seg0.q,
                    dp_steps=sum(s.steps for s in p.segments),
                    segments=[s.to_dict() for s in p.segments],
                    lifetime_epsilon_site_reported=p.lifetime_epsilon,
                    ledger_head=p.ledger_head,
                    ledger_head_seq=p.ledger_seq,
                )
            sites[name] = entry
        return {
            "central": self._central_summary(),
            "privacy_unit": "record (one row of a site's training data), add/remove neighbours",
            "mechanism": "DP-SGD: Poisson sampling, per-example clipping, Gaussian noise (Opacus)",
            "target_epsilon": self.job.privacy.target_epsilon if self.job.privacy.enabled else None,
            "sites": sites,
            "job_fingerprint": self.job.fingerprint(),
            "run": self._run_status(finished),
            "versions": library_versions(),
            "caveats": [
                "Opacus secure_mode (cryptographically secure noise) was not used: it "
                "needs torchcsprng, which has no release for this torch version.",
                *(
                    [
                        "Central DP noise comes from torch's Mersenne Twister generator "
                        "seeded from the operating system's CSPRNG; the generator itself is "
                        "not cryptographically secure."
                    ]
                    if self.central_sigma is not None
                    else []
                ),
            ],
        }

    def _run_status(self, finished: bool) -> dict[str, Any]:
        """How far the run got: ``complete`` when its last round was recorded aggregated. A
        file written after a round while others remain says ``incomplete`` and not
        ``stopped``: read after a crash, it is what was on disk when the run was killed."""
        planned, rec = self.job.federation.rounds, self.record
        # no round started yet: the run stopped in round 1
        current = rec.round if rec is not None else 1
        aggregated = bool(rec is not None and rec.aggregated)
        recorded = current - (0 if aggregated else 1)
        complete = finished and recorded >= planned and aggregated
        if complete:
            note = f"all {planned} rounds recorded"
        elif finished:
            reason = rec.reason if rec is not None else None
            note = f"stopped in round {current} of {planned}: " + str(reason or "see metrics.jsonl")
        else:
            note = f"written when round {recorded} of {planned} finished, while the run went on"
        return {
            "status": "complete" if complete else "incomplete",
            "stopped": finished,
            "rounds_planned": planned,
            "rounds_finished": recorded,
            "rounds_aggregated": self.aggregated_rounds,
            "adapter": bool(finished and self.aggregated_rounds),
            "note": note,
        }

    def _central_epsilon(self, accountant: str) -> float:
        c = self.job.privacy.central
        assert self.central_sigma is not None
        segment = Segment(1.0, self.central_sigma, self.aggregated_rounds)
        return epsilon([segment], c.delta, accountant)  # type: ignore[arg-type]

    def _central_summary(self) -> dict[str, Any] | None:
        """Site-level DP figures, or None when central DP is off."""
        c = self.job.privacy.central
        if self.central_sigma is None or c.clip_norm is None:
            return None
        accountant = self.job.privacy.accountant
        reported = self._central_epsilon(accountant)
        exact = gaussian_epsilon(self.central_sigma, self.aggregated_rounds, c.delta)
        # inf (beyond the accountant's range, see accounting.epsilon) is a valid if empty bound
        ok = math.isinf(reported) or abs(reported - exact) <= EPSILON_TOLERANCE * max(exact, 1e-9)
        roster = len(self.job.federation.site_names)
        return {
            "privacy_unit": "site: everything one site contributes (all of its records), "
            "zero-out neighbours (its update replaced by nothing)",
            "mechanism": "Gaussian mechanism on the sum of site updates, each clipped to L2 "
            "norm clip_norm and weighted by at most 1, divided by the number of sites on the "
            "roster; every site is asked every round, so no sampling amplification (q = 1)",
            "covers": "every global adapter the coordinator releases (each round's and the "
            "final one); not the per-round metrics in metrics.jsonl",
            "weighting": WEIGHTING_TEXT[c.weighting],
            "records_cap": c.records_cap,
            "denominator": roster,
            "clip_norm": c.clip_norm,
            "noise_multiplier": self.central_sigma,
            "noise_std_of_mean": self.central_sigma * c.clip_norm / roster,
            "target_epsilon": c.target_epsilon,
            "rounds_released": self.aggregated_rounds,
            "delta": c.delta,
            "epsilon": reported,
            "accountant": accountant,
            "accountant_detail": ACCOUNTANT_NAMES[accountant],
            "epsilon_recomputed_pld": self._central_epsilon("pld"),
            "epsilon_rdp": self._central_epsilon("rdp"),
            "epsilon_analytic": exact,
            "epsilon_analytic_detail": "closed form for composed Gaussian mechanisms "
            "(Balle and Wang 2018), fedslm.privacy.accounting.gaussian_epsilon",
            "epsilon_check": "ok" if ok else "MISMATCH",
        }

    def _account(self, r: SiteReport, round_num: int, anchor: bool = True) -> None:
        if (r.site, round_num) in self._accounted:
            return  # the same release, sent again for a retried or resumed round
        self._accounted.add((r.site, round_num))
        p = self.privacy.setdefault(r.site, _SitePrivacy())
        p.records = r.num_examples
        p.rounds += 1
        if r.segment is not None:
            p.segments.append(r.segment)
            p.reported_epsilon = r.epsilon
            p.delta, p.accountant, p.max_grad_norm = r.delta, r.accountant, r.max_grad_norm
            p.lifetime_epsilon = r.lifetime_epsilon
            if anchor:
                p.ledger_head, p.ledger_seq = r.ledger_head, r.ledger_seq
            if anchor and r.ledger_head and r.ledger_seq is not None:
                where = f"run {self.out.name} round {round_num}"
                self.anchors[r.site] = Anchor(r.ledger_seq, r.ledger_head, where)


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl``; a line torn by a crash while it was being
    appended is cut off (its round is not complete and will run again)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        write_text(path, text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _privacy_to_dict(p: _SitePrivacy) -> dict[str, Any]:
    d = dict(p.__dict__)
    d["segments"] = [[s.q, s.sigma, s.steps] for s in p.segments]
    return d


def _privacy_from_dict(d: dict[str, Any]) -> _SitePrivacy:
    d = dict(d)
    d["segments"] = [Segment(float(q), float(sigma), int(n)) for q, sigma, n in d["segments"]]
    return _SitePrivacy(**d)


def _site_record(r: SiteReport) -> dict[str, Any]:
    """What ``metrics.jsonl`` keeps of one site's training reply."""
    return {
        "train_loss": r.train_loss,
        "steps": r.steps,
        "num_examples": r.num_examples,
        "seconds": r.seconds,
        "privacy_seconds": r.privacy_seconds,
        "bytes_sent": r.bytes_sent,
        "epsilon": r.epsilon,
        # the head the site released this round: anchors its ledger (fedslm.privacy.anchors)
        "ledger_seq": r.ledger_seq,
        "ledger_head": r.ledger_head,
    }


def read_site_anchors(path: Path | None) -> dict[str, Anchor]:
    """The coordinator's record of each site's last ledger head (``{}`` if none yet)."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            str(s): Anchor(int(a["seq"]), str(a["hash"]), str(a.get("where", path)))
            for s, a in data.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FederationError(
            f"{path}: the coordinator's record of site ledger heads is unreadable ({exc}); "
            "restore it from a backup (deleting it forgets every site's anchored head)"
        ) from None


def head_conflict(anchored: Anchor | None, seq: int | None, head: str | None) -> str | None:
    """Why a site's new ledger head ``(seq, head)`` cannot extend its ``anchored`` head (None:
    it can). Pure.

    A site appends before it replies, so a new head has a later seq than the anchored one, or
    the same seq and hash (a round replayed). Without the entries in between the coordinator
    cannot check the hashes that link them; the site checks that (``fedslm.privacy.anchors``).
    """
    if anchored is None or anchored.seq is None or head is None or seq is None:
        return None
    a_seq, a_hash, where = anchored.seq, anchored.hash, anchored.source
    if seq > a_seq or (seq == a_seq and head == a_hash):
        return None
    return (
        f"its ledger head is now entry seq {seq} ({head[:16]}…) but {where} anchored its entry "
        f"seq {a_seq} ({a_hash[:16]}…): the site's ledger diverges from the anchored chain at "
        f"entry seq {seq} at the latest (entries deleted or rewritten, later hashes "
        "recomputed); the site must restore its ledger from a backup that extends the anchored "
        "head"
    )
