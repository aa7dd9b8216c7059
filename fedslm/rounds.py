"""One round, written once: the order in which a job's rounds call the ``Coordinator``.

Every way of running a job (Flower in simulation and deployment, ``fedslm/inprocess.py``, the
pooled baseline of ``fedslm/centralized.py``) runs ``run_round_sequence``; what differs is only
how the sites' replies are obtained, which the caller passes in as a ``RoundTransport``.
A round is:

1. ``transport.train``: the sites train on the global adapter (and, when the transport
   defers evaluation, first evaluate the previous round's adapter: one message per round);
2. the previous round's line is completed with the evaluations that came with them
   (deferred case);
3. ``Coordinator.start_round``, then ``transport.aggregate`` hands the replies to the
   coordinator;
4. the round's evaluations are collected (``transport.evaluate``) and the round ended, or,
   deferred, the round is saved (``Coordinator.save_round``) until its evaluation comes with
   the next round's replies. The last round's evaluation gets an exchange of its own.

``RoundRecord`` is the typed record of one round, the line ``metrics.jsonl`` keeps of it, and
``SiteRound`` what that line keeps of each site.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from fedslm.errors import FederationError

if TYPE_CHECKING:
    from fedslm.coordinator import Coordinator
    from fedslm.progress import Reporter


@dataclass
class SiteRound:
    """One site in a round's line of ``metrics.jsonl`` (``RoundRecord.sites[site]``).

    Its keys come in groups, each in the line only when it happened to the site this round
    (``to_dict``); within a group a None is written as null:

    - training (``trained``: the coordinator kept the site's training reply): ``train_loss``
      .. ``ledger_head``, what the reply said (``epsilon``, ``ledger_seq`` and ``ledger_head``
      are None without DP), and how the coordinator saw the update: ``update_norm`` (plain
      aggregation: the norm screening measured) or ``in_secure_sum`` (secure aggregation:
      whether the site's masked input reached the sum);
    - evaluation (``evaluation_in``): ``eval_loss``, ``eval_accuracy``, ``eval_examples``;
    - ``eval_withheld``: the site sent its evaluation without numbers, and why.
    """

    trained: bool = False
    train_loss: float | None = None
    steps: int | None = None
    num_examples: int | None = None
    seconds: float | None = None
    privacy_seconds: float | None = None
    bytes_sent: int | None = None
    epsilon: float | None = None
    # the head the site released this round: anchors its ledger (fedslm.privacy.anchors)
    ledger_seq: int | None = None
    ledger_head: str | None = None
    update_norm: float | None = None
    in_secure_sum: bool | None = None
    evaluation_in: bool = False
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_examples: int | None = None
    eval_withheld: str | None = None

    TRAINING: ClassVar[tuple[str, ...]] = (
        "train_loss",
        "steps",
        "num_examples",
        "seconds",
        "privacy_seconds",
        "bytes_sent",
        "epsilon",
        "ledger_seq",
        "ledger_head",
    )
    EVALUATION: ClassVar[tuple[str, ...]] = ("eval_loss", "eval_accuracy", "eval_examples")
    # written when not None: the one way the coordinator saw the update, or a withheld evaluation
    WHEN_SET: ClassVar[tuple[str, ...]] = ("update_norm", "in_secure_sum", "eval_withheld")

    def to_dict(self) -> dict[str, Any]:
        """The site's entry in the round's line."""
        groups = ((self.trained, self.TRAINING), (self.evaluation_in, self.EVALUATION))
        d = {k: getattr(self, k) for happened, keys in groups if happened for k in keys}
        return d | {k: v for k in self.WHEN_SET if (v := getattr(self, k)) is not None}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> SiteRound:
        """A site's entry read back (a resumed run). A group is in when any of its keys is: a
        key of it that an earlier fedslm did not write (``ledger_seq``) reads as None. A key
        no group declares is a ``ValueError`` naming it."""
        declared = {f.name for f in fields(cls)} - {"trained", "evaluation_in"}
        unknown = sorted(set(entry) - declared)
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a key of a site's record (it has {', '.join(entry)})"
            )
        return cls(
            trained=any(k in entry for k in cls.TRAINING),
            evaluation_in=any(k in entry for k in cls.EVALUATION),
            **entry,
        )


@dataclass
class RoundRecord:
    """One round as ``metrics.jsonl`` keeps it (``to_dict``: the line's keys and values).

    Fields that are None (``aggregated``: the round was never aggregated, ``evaluated``: never
    written) are left out of the line, as are the aggregation's fields before it ran and the
    evaluation's before it came in. ``rule`` holds what the aggregation rule adds to the line
    (e.g. ``exact_energy_lost``), at its top level.
    """

    round: int
    sites: dict[str, SiteRound] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # set when aggregation begins (``Coordinator._begin_aggregation``): with ``aggregated``
    refusals: dict[str, list[str]] = field(default_factory=dict)
    train_loss: float | None = None
    bytes_sent: dict[str, int | None] = field(default_factory=dict)
    aggregated: bool | None = None
    reason: str | None = None
    secure_aggregation: dict[str, Any] | None = None
    central_dp: dict[str, Any] | None = None
    rule: dict[str, Any] = field(default_factory=dict)
    # set by ``Coordinator.record_evaluation``: with ``evaluation_in``
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    evaluation_in: bool = False
    # set when the line is written (``Coordinator.save_round`` / ``end_round``)
    wall_seconds: float | None = None
    evaluated: bool | None = None
    finished_at: float | None = None
    epsilon: dict[str, float | None] | None = None
    central_epsilon: float | None = None
    # how many times a round that could not be aggregated was sent (Flower's retries)
    attempts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The round's line of ``metrics.jsonl`` (keys are sorted when it is written)."""
        d: dict[str, Any] = {
            "round": self.round,
            "sites": {name: site.to_dict() for name, site in self.sites.items()},
            "failures": self.failures,
        }
        if self.aggregated is not None:
            d |= {
                "refusals": self.refusals,
                "train_loss": self.train_loss,
                "bytes_sent": self.bytes_sent,
                "aggregated": self.aggregated,
            }
        d |= self.rule
        if self.evaluation_in:
            d |= {"eval_loss": self.eval_loss, "eval_accuracy": self.eval_accuracy}
        optional = {
            "reason": self.reason,
            "secure_aggregation": self.secure_aggregation,
            "central_dp": self.central_dp,
            "wall_seconds": self.wall_seconds,
            "evaluated": self.evaluated,
            "finished_at": self.finished_at,
            "epsilon": self.epsilon,
            "central_epsilon": self.central_epsilon,
            "attempts": self.attempts,
        }
        return d | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_dict(cls, line: dict[str, Any]) -> RoundRecord:
        """A round read back from its ``metrics.jsonl`` line (a resumed run); keys it does not
        declare are the aggregation rule's."""
        d = dict(line)
        num = int(d.pop("round"))
        sites: dict[str, SiteRound] = {}
        for name, entry in d.pop("sites").items():
            try:
                sites[name] = SiteRound.from_dict(entry)
            except ValueError as exc:
                raise ValueError(f"round {num}: sites.{name}: {exc}") from None
        rec = cls(round=num, sites=sites, failures=d.pop("failures"))
        if "aggregated" in d:
            rec.aggregated = bool(d.pop("aggregated"))
            rec.refusals = d.pop("refusals", {})
            rec.train_loss = d.pop("train_loss", None)
            rec.bytes_sent = d.pop("bytes_sent", {})
        if "eval_loss" in d or "eval_accuracy" in d:
            rec.evaluation_in = True
            rec.eval_loss, rec.eval_accuracy = (
                d.pop("eval_loss", None),
                d.pop("eval_accuracy", None),
            )
        for name in (
            "reason",
            "secure_aggregation",
            "central_dp",
            "wall_seconds",
            "evaluated",
            "finished_at",
            "epsilon",
            "central_epsilon",
            "attempts",
        ):
            if name in d:
                setattr(rec, name, d.pop(name))
        rec.rule = d
        return rec


class RoundTransport(Protocol):
    """How a round's replies are obtained: Flower messages, in-process ``Site`` calls, or the
    pooled site of the centralized baseline. Each method hands what it obtained to the
    coordinator (``aggregate``, ``aggregate_secure``, ``record_evaluation``) itself, since the
    decoding (wire records, refusals, secure aggregation's stages) is the transport's own."""

    defers_evaluation: bool
    """True: a round's evaluation rides on the next round's training messages (``train`` is
    given its number), and the last round's is asked for on its own. False: ``evaluate`` is
    called right after each round's aggregation."""

    def train(self, round_num: int, evaluate_round: int | None) -> float | None:
        """Have the sites train round ``round_num`` on the global adapter and keep their
        replies for ``aggregate``. With ``evaluate_round`` (deferred evaluation only), the
        sites first evaluate that round's global adapter, the one they are sent, and the
        evaluations are folded into the coordinator's record (``record_evaluation``), which
        still holds that round. Returns when the training was asked for
        (``time.perf_counter()``), or None for now."""
        ...

    def aggregate(self, round_num: int) -> bool:
        """Hand ``train``'s replies to the coordinator; True when the round was aggregated."""
        ...

    def evaluate(self, round_num: int) -> None:
        """Have the sites evaluate the global adapter of round ``round_num`` and fold their
        evaluations into the coordinator's record."""
        ...


def run_round_sequence(
    coordinator: Coordinator,
    transport: RoundTransport,
    reporter: Reporter,
    *,
    first_round: int = 1,
    retries: int = 0,
    stop_when_not_aggregated: bool = False,
) -> None:
    """Rounds ``first_round`` .. ``federation.rounds`` of the coordinator's job.

    A round that cannot be aggregated is, with ``stop_when_not_aggregated``, sent again up to
    ``retries`` times while sites failed (a retry cannot mend a round in which nothing failed,
    e.g. every site refused), its ``attempts`` recorded, and then the run stops with the
    round's reason (FederationError). Without, it is evaluated and recorded as it is, and the
    next round starts from the same adapter. Either way the round's record is written.
    """
    if retries and not stop_when_not_aggregated:
        raise ValueError("retries need stop_when_not_aggregated: a round given up goes on")
    rounds = coordinator.job.federation.rounds
    # the last aggregated round whose evaluation is still to come (a resumed run: the round it
    # resumed after, when the crash came before that round's evaluation)
    pending: int | None = coordinator.pending_evaluation
    for r in range(first_round, rounds + 1):
        for attempt in range(retries + 1):
            started = transport.train(r, pending)
            if pending is not None:
                reporter.round_done(coordinator.end_round(), rounds)
                pending = None
            coordinator.start_round(r, started=started)
            aggregated = transport.aggregate(r)
            if aggregated and transport.defers_evaluation:
                coordinator.save_round()  # on disk now: its evaluation comes with round r+1
                pending = r
                break
            if aggregated or not stop_when_not_aggregated:
                # evaluated at once; a round not aggregated is recorded with the old adapter's
                transport.evaluate(r)
                reporter.round_done(coordinator.end_round(), rounds)
                break
            rec = coordinator.round_in_hand()
            rec.attempts = attempt + 1
            if not rec.failures or attempt == retries:
                reporter.round_done(coordinator.end_round(), rounds)
                raise FederationError(
                    f"round {r} could not be aggregated after {attempt + 1} attempt(s): "
                    f"{rec.reason or 'no usable update'}; failures: "
                    f"{'; '.join(rec.failures) or 'none'} "
                    f"(all recorded in {coordinator.out / 'metrics.jsonl'})"
                )
            reporter.warn(f"round {r} not aggregated ({rec.reason}); sending it again")
    if pending is not None:
        transport.evaluate(pending)
        reporter.round_done(coordinator.end_round(), rounds)
