"""The coordinator's side of a job, without Flower: aggregate each round, keep the record.

The Flower strategy in ``fedslm.server`` decodes messages into ``SiteReport`` objects and hands
them here; everything that is decided or written about a round happens in this module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedslm.aggregation import fedavg, weighted_mean
from fedslm.artifacts import append_jsonl, library_versions, write_json
from fedslm.config import JobConfig
from fedslm.errors import FederationError
from fedslm.models.adapter import AdapterState, check_compatible, export_adapter
from fedslm.privacy.accounting import ACCOUNTANT_NAMES, Segment, epsilon

# Reported and recomputed epsilons may differ by the accountants' discretisation, not more
EPSILON_TOLERANCE = 0.01


@dataclass(frozen=True)
class SiteReport:
    """One site's training reply, as the coordinator received it."""

    site: str
    state: AdapterState
    num_examples: int
    train_loss: float
    steps: int
    seconds: float
    bytes_sent: int
    segment: Segment | None
    epsilon: float | None
    delta: float | None
    accountant: str | None
    max_grad_norm: float | None
    lifetime_epsilon: float | None = None
    ledger_head: str | None = None


@dataclass(frozen=True)
class SiteEval:
    """One site's evaluation of the global adapter on its held-out split."""

    site: str
    loss: float
    accuracy: float
    num_examples: int


@dataclass
class _SitePrivacy:
    segments: list[Segment] = field(default_factory=list)
    reported_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    max_grad_norm: float | None = None
    lifetime_epsilon: float | None = None
    ledger_head: str | None = None
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
    ) -> None:
        self.job = job
        self.out = out_dir
        self.model = export_model
        self.state = initial_state
        self.metadata = metadata
        self.privacy: dict[str, _SitePrivacy] = {}
        self.aggregated_rounds = 0
        self.record: dict[str, Any] = {}  # the current round, as it will be written
        self._round_start = time.perf_counter()

    # -- per round --------------------------------------------------------------------------

    def start_round(self, round_num: int) -> None:
        """Mark the start of a round (wall time is measured from here)."""
        self.record = {"round": round_num, "sites": {}, "failures": []}
        self._round_start = time.perf_counter()

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
        rec = self.record
        rec["failures"] = list(failures)
        rec["refusals"] = dict(refusals or {})
        for site, reasons in rec["refusals"].items():
            self.privacy.setdefault(site, _SitePrivacy()).refusals.append(
                f"round {round_num}: {'; '.join(reasons)}"
            )
        good: list[SiteReport] = []
        for r in reports:
            try:
                check_compatible(self.state, r.state)
            except FederationError as exc:
                rec["failures"].append(f"{r.site}: update rejected: {exc}")
                continue
            good.append(r)
            self._account(r)
            rec["sites"][r.site] = {
                "train_loss": r.train_loss,
                "steps": r.steps,
                "num_examples": r.num_examples,
                "seconds": r.seconds,
                "bytes_sent": r.bytes_sent,
                "epsilon": r.epsilon,
            }
        needed = self.job.federation.required_sites
        rec["train_loss"] = weighted_mean((r.train_loss, r.num_examples) for r in good)
        rec["bytes_sent"] = {r.site: r.bytes_sent for r in good}
        if len(good) < needed:
            rec["aggregated"] = False
            asked = len(reports) + len(failures) + len(rec["refusals"])
            rec["reason"] = (
                f"only {len(good)} of {asked} sites returned a usable update "
                f"({len(rec['refusals'])} refused); federation.min_sites is {needed}"
            )
            return None
        self.state = fedavg((r.state, float(r.num_examples)) for r in good)
        self.aggregated_rounds += 1
        rec["aggregated"] = True
        return self.state

    def record_evaluation(self, evals: list[SiteEval], failures: list[str]) -> dict[str, float]:
        """Fold the sites' evaluations of the global adapter into this round's record."""
        rec = self.record
        for e in evals:
            rec["sites"].setdefault(e.site, {}).update(
                eval_loss=e.loss, eval_accuracy=e.accuracy, eval_examples=e.num_examples
            )
        rec["failures"].extend(f"evaluate: {f}" for f in failures)
        rec["eval_loss"] = weighted_mean((e.loss, e.num_examples) for e in evals)
        rec["eval_accuracy"] = weighted_mean((e.accuracy, e.num_examples) for e in evals)
        return {k: rec[k] for k in ("eval_loss", "eval_accuracy") if rec[k] is not None}

    def end_round(self) -> dict[str, Any]:
        """Write this round's checkpoint and its line of ``metrics.jsonl``; return the line."""
        rec = self.record
        rec["wall_seconds"] = time.perf_counter() - self._round_start
        rec["epsilon"] = {s: p.reported_epsilon for s, p in self.privacy.items()}
        export_adapter(
            self.model,
            self.state,
            self.out / "checkpoints" / f"round-{rec['round']}",
            self.metadata | {"round": rec["round"]},
        )
        append_jsonl(self.out / "metrics.jsonl", rec)
        return rec

    # -- end of job ---------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Export the final adapter and write ``privacy.json``; return the privacy summary."""
        export_adapter(self.model, self.state, self.out / "adapter", self.metadata)
        summary = self.privacy_summary()
        write_json(self.out / "privacy.json", summary)
        return summary

    def privacy_summary(self) -> dict[str, Any]:
        """Per site: epsilon as the site reported it, and recomputed here from its segments."""
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
                )
            sites[name] = entry
        return {
            "privacy_unit": "record (one row of a site's training data), add/remove neighbours",
            "mechanism": "DP-SGD: Poisson sampling, per-example clipping, Gaussian noise (Opacus)",
            "target_epsilon": self.job.privacy.target_epsilon if self.job.privacy.enabled else None,
            "sites": sites,
            "job_fingerprint": self.job.fingerprint(),
            "versions": library_versions(),
            "caveats": [
                "Opacus secure_mode (cryptographically secure noise) was not used: it "
                "needs torchcsprng, which has no release for this torch version."
            ],
        }

    def _account(self, r: SiteReport) -> None:
        p = self.privacy.setdefault(r.site, _SitePrivacy())
        p.records = r.num_examples
        p.rounds += 1
        if r.segment is not None:
            p.segments.append(r.segment)
            p.reported_epsilon = r.epsilon
            p.delta, p.accountant, p.max_grad_norm = r.delta, r.accountant, r.max_grad_norm
            p.lifetime_epsilon, p.ledger_head = r.lifetime_epsilon, r.ledger_head
