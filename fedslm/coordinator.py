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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedslm.aggregation import weighted_mean
from fedslm.artifacts import write_json
from fedslm.config import JobConfig
from fedslm.errors import FederationError
from fedslm.messages import SiteEval, SiteReport
from fedslm.models.adapter import AdapterState
from fedslm.privacy.accounting import calibrate_noise
from fedslm.privacy.anchors import Anchor
from fedslm.privacy.central import noised_mean_update, site_weight
from fedslm.privacy_summary import SitePrivacy, central_epsilon, privacy_summary
from fedslm.robust import clip_update, coordinate_median, trimmed_mean
from fedslm.rounds import RoundRecord, SiteRound
from fedslm.run_outputs import ResumeState, RunOutputs
from fedslm.secagg.adapter import mean_state
from fedslm.secagg.messages import SecAggResult
from fedslm.server_opt import make_server_optimizer


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


class Coordinator:
    """Holds the global adapter, aggregates each round and keeps the round's record; its
    ``outputs`` (``fedslm.run_outputs``) write ``metrics.jsonl``, checkpoints, ``adapter/`` and
    ``privacy.json`` (described by ``fedslm.privacy_summary``) under ``out_dir``."""

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
        self.outputs = RunOutputs(out_dir, export_model, metadata)
        self.state = initial_state
        self.privacy: dict[str, SitePrivacy] = {}
        self.aggregated_rounds = 0
        self.record: RoundRecord | None = None  # the current round, as it will be written
        # (site, round) pairs already accounted: a retried round whose sites replay the same
        # release must not count their spend twice
        self._accounted: set[tuple[str, int]] = set()
        self._aggregated_at: float | None = None  # when the round in hand was aggregated
        self._counted_until: float | None = None  # the end of the last round's wall time
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
        self.server_optimizer = make_server_optimizer(server.name, **server.hyperparameters())
        # every site's last ledger head from earlier runs (deployed: one file for all runs)
        self.anchors_file = anchors_file
        self.anchors = read_site_anchors(anchors_file)

    # -- per round --------------------------------------------------------------------------

    def round_in_hand(self) -> RoundRecord:
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
        """Screen each update, then combine the accepted ones (``_combine``: the job's
        aggregation rule weighted by training records, or a robust rule; under central DP the
        clipped and noised mean) and step the server optimizer.

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
            rec.sites[r.site] = _site_record(r, update_norm=screening.norms.get(r.site))
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
            rec.sites[r.site] = _site_record(
                r, in_secure_sum=r.site in set(survivors) and result is not None
            )
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
        self.round_in_hand().aggregated = True
        self._aggregated_at = time.perf_counter()
        return self.state

    def _begin_aggregation(
        self, round_num: int, failures: list[str], refusals: dict[str, list[str]] | None
    ) -> RoundRecord:
        """Start the round's record with its failures and refusals (kept per site too); it
        says not aggregated until ``_apply`` moves the global adapter."""
        rec = self.round_in_hand()
        rec.aggregated = False
        rec.failures = list(failures)
        rec.refusals = dict(refusals or {})
        for site, reasons in rec.refusals.items():
            self.privacy.setdefault(site, SitePrivacy()).refusals.append(
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
        self.round_in_hand().rule.update(combined.record)
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
        self.round_in_hand().central_dp = {
            "sites": result.sites,
            "clipped": result.clipped,
            "noise_std_of_mean": result.noise_std / roster,
        }
        return result.state

    def record_evaluation(self, evals: list[SiteEval], failures: list[str]) -> dict[str, float]:
        """Fold the sites' evaluations of the global adapter into this round's record."""
        rec = self.round_in_hand()
        for e in evals:
            site = rec.sites.setdefault(e.site, SiteRound())
            if e.withheld is not None:
                site.eval_withheld = e.withheld
            else:
                site.evaluation_in = True
                site.eval_loss, site.eval_accuracy = e.loss, e.accuracy
                site.eval_examples = e.num_examples
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
        rec = self.round_in_hand()
        assert rec.aggregated, "save_round of a round that was not aggregated"
        assert self._counted_until is not None, "save_round before start_round"
        # provisional: end_round recounts the last round up to its own evaluation
        rec.wall_seconds = (self._aggregated_at or time.perf_counter()) - self._counted_until
        rec.evaluated = False
        self._write_round(rec)
        self.outputs.write_privacy(self.privacy_summary())

    def end_round(self) -> RoundRecord:
        """Write this round's checkpoint and its line of ``metrics.jsonl``; return the round.
        A round that was not aggregated trained nothing new: it gets its line, no checkpoint."""
        rec = self.round_in_hand()
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
            rec.central_epsilon = central_epsilon(
                self.job, self.central_sigma, self.aggregated_rounds, self.job.privacy.accountant
            )
        if self.outputs.needs_checkpoint(rec):
            self.outputs.write_checkpoint(
                rec.round, self.state, self.server_optimizer.state_dict(), self._resume_state()
            )
        self.outputs.write_line(rec)
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
        rec = self.round_in_hand()
        rec.failures.append(f"update rejected: {reason}")
        self.privacy.setdefault(r.site, SitePrivacy()).refusals.append(
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

    def _resume_state(self) -> ResumeState:
        """What ``resume`` needs beyond the exported adapter (``fedslm.run_outputs``)."""
        return ResumeState(
            round=self.round_in_hand().round,
            state=self.state,
            aggregated_rounds=self.aggregated_rounds,
            privacy=self.privacy,
            accounted=self._accounted,
            noise=self._noise.get_state(),
        )

    def resume(self) -> int:
        """Continue from the last completed round in ``out_dir``; return its number (0: none).

        A round is complete when its line is in ``metrics.jsonl`` (written after its
        checkpoint) and says it was aggregated. The global adapter, server optimizer state,
        per-site privacy record and central noise generator are restored; the interrupted
        round is run again from the same global adapter, so a site asked again replays what it
        released instead of spending.
        """
        done = self.outputs.aggregated_lines()
        if not done:
            return 0
        last = int(done[-1]["round"])
        saved, optimizer = self.outputs.read_checkpoint(last)
        self.state = saved.state
        self.server_optimizer.load_state_dict(optimizer)
        self.aggregated_rounds = saved.aggregated_rounds
        self.privacy = saved.privacy
        self._accounted = saved.accounted
        self._noise.set_state(saved.noise)
        if done[-1].get("evaluated") is False:
            # killed before the round's evaluation came back: its line is completed by the
            # evaluation that rides on the next round's messages (``pending_evaluation``)
            try:
                self.record = RoundRecord.from_dict(done[-1])
            except ValueError as exc:
                raise FederationError(
                    f"{self.outputs.metrics}: cannot resume from its last line ({exc}): "
                    "resume the run with the fedslm release that wrote it"
                ) from None
            self.outputs.saved_round = last
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
            self.outputs.export_final(self.state)
        summary = self.privacy_summary(finished=True)
        self.outputs.write_privacy(summary)
        return summary

    def privacy_summary(self, finished: bool = False) -> dict[str, Any]:
        """``privacy.json`` as of now (``fedslm.privacy_summary.privacy_summary``)."""
        return privacy_summary(
            self.job,
            self.privacy,
            self.record,
            self.aggregated_rounds,
            self.central_sigma,
            finished,
        )

    def _account(self, r: SiteReport, round_num: int, anchor: bool = True) -> None:
        if (r.site, round_num) in self._accounted:
            return  # the same release, sent again for a retried or resumed round
        self._accounted.add((r.site, round_num))
        p = self.privacy.setdefault(r.site, SitePrivacy())
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


def _site_record(
    r: SiteReport, *, update_norm: float | None = None, in_secure_sum: bool | None = None
) -> SiteRound:
    """What ``metrics.jsonl`` keeps of one site's training reply, and of how its update was
    seen: its norm (plain aggregation) or whether it reached the secure sum."""
    return SiteRound(
        trained=True,
        train_loss=r.train_loss,
        steps=r.steps,
        num_examples=r.num_examples,
        seconds=r.seconds,
        privacy_seconds=r.privacy_seconds,
        bytes_sent=r.bytes_sent,
        epsilon=r.epsilon,
        ledger_seq=r.ledger_seq,
        ledger_head=r.ledger_head,
        update_norm=update_norm,
        in_secure_sum=in_secure_sum,
    )


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
