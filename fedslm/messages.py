"""The messages between a site and its coordinator, as typed objects that own their keys.

A site's reply travels as a few records (Flower's MetricRecord and ConfigRecord in
``fedslm.wire.codec``): numeric *metrics* and identifying or DP *fields*. Each message here
declares those keys once, with their types (``WireKey``), and converts itself to and from the
plain dictionaries that go into the records:

- ``SiteReport``: a training reply (the adapter travels beside it as tensors);
- ``SiteEval``: an evaluation reply, or the evaluation a training reply carries;
- ``Refusal``: a site's refusal, with its own policy reasons;
- ``TrainInstruction``, ``EvalInstruction``, ``StageInstruction``: what the coordinator's
  train, evaluate and secure-aggregation messages carry in their config for the round;
- ``DeployedJob``: the job, its id, its base model's hash and the coordinator's versions,
  which every message of a deployed job carries in its config (a simulated job's messages
  carry its manifest instead, ``MANIFEST``).

The site's egress guard derives its allow-lists from these declarations
(``fedslm.egress.ALLOWED_METRICS`` / ``ALLOWED_FIELDS``), and the coordinator refuses a
received record with a key no message declares, or without one it requires, naming the key.
No Flower here: the site and the coordinator both import this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedslm.models.adapter import AdapterState
from fedslm.privacy.accounting import Segment
from fedslm.privacy.anchors import Anchor
from fedslm.secagg.messages import EncryptedShares, KeyAdvert, MaskedInput, UnmaskShares


@dataclass(frozen=True)
class WireKey:
    """One key of a message's record: its name on the wire, the types its value may have,
    what it means, and whether a sender may leave it out (sites of earlier fedslm releases
    do not send every key this one does)."""

    name: str
    types: tuple[type, ...]
    meaning: str
    required: bool = True


def _keys(*keys: WireKey) -> dict[str, WireKey]:
    return {k.name: k for k in keys}


# -- what a site sends ----------------------------------------------------------------------

NUM_EXAMPLES = WireKey("num-examples", (int,), "training (or evaluation) records")
SITE = WireKey("site", (str,), "the site's name")


def check_keys(
    message: str, record: str, values: Mapping[str, Any], declared: Mapping[str, WireKey]
) -> None:
    """``ValueError`` naming the first key of ``values`` that ``declared`` does not list, or
    the first required key it lacks: a received ``record`` of ``message`` is decoded only
    when it holds exactly what the message declares."""
    unknown = sorted(k for k in values if k not in declared)
    if unknown:
        raise ValueError(
            f"{message}: {record} {unknown[0]!r} is not part of the message "
            f"(it declares {', '.join(declared)})"
        )
    missing = [k for k, key in declared.items() if key.required and k not in values]
    if missing:
        raise ValueError(f"{message}: {record} {missing[0]!r} is missing")


@dataclass(frozen=True)
class SiteReport:
    """One site's training reply, as the coordinator received it.

    On the wire: the adapter's tensors, the metrics ``METRICS`` and the fields ``FIELDS``
    (the DP fields only when the site trained under DP). ``state``, ``segment`` and
    ``bytes_sent`` are the coordinator's view of them.
    """

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
    privacy_seconds: float = 0.0
    ledger_seq: int | None = None  # the seq of the ledger entry whose hash is ledger_head

    KIND: ClassVar[str] = "training reply"
    METRICS: ClassVar[dict[str, WireKey]] = _keys(
        NUM_EXAMPLES,
        WireKey("train-loss", (float,), "mean training loss of the round"),
        WireKey("steps", (int,), "local optimizer steps"),
        WireKey("seconds", (float,), "local training time"),
        # sites before fedslm reported privacy time leave it out
        WireKey("privacy-seconds", (float,), "time spent on policy, ledger and accounting", False),
    )
    # the DP segment and what the site's own accountant and ledger say about it
    DP_FIELDS: ClassVar[dict[str, WireKey]] = _keys(
        WireKey("q", (float,), "sampling rate"),
        WireKey("sigma", (float,), "noise multiplier"),
        WireKey("dp_steps", (int,), "DP-SGD steps of the round"),
        WireKey("epsilon", (float,), "the job's epsilon at the site"),
        WireKey("delta", (float,), "the job's delta"),
        WireKey("accountant", (str,), "the site's accountant"),
        WireKey("max_grad_norm", (float,), "per-example clipping norm"),
        WireKey("lifetime_epsilon", (float,), "the site's epsilon over all its jobs"),
        WireKey("ledger_head", (str,), "hash of the site's newest ledger entry"),
        # sites before fedslm sent their heads with a seq leave it out
        WireKey("ledger_seq", (int,), "seq of that ledger entry", False),
    )
    FIELDS: ClassVar[dict[str, WireKey]] = _keys(
        SITE,
        WireKey("dp", (bool,), "whether the round ran under DP"),
        *(WireKey(k.name, k.types, k.meaning, False) for k in DP_FIELDS.values()),
    )

    def wire_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The reply's metrics and fields as the site sends them (the tensors go apart).

        NaN and inf are not allowed on the wire: a loss or lifetime epsilon that is not
        available travels as -1.
        """
        metrics = {
            "num-examples": self.num_examples,
            "train-loss": self.train_loss if math.isfinite(self.train_loss) else -1.0,
            "steps": self.steps,
            "seconds": self.seconds,
            "privacy-seconds": self.privacy_seconds,
        }
        fields: dict[str, Any] = {"site": self.site, "dp": self.segment is not None}
        if self.segment is not None and self.epsilon is not None:
            fields.update(
                q=float(self.segment.q),
                sigma=float(self.segment.sigma),
                dp_steps=int(self.segment.steps),
                epsilon=float(self.epsilon),
                delta=_required(self.delta, "delta"),
                accountant=self.accountant,
                max_grad_norm=_required(self.max_grad_norm, "max_grad_norm"),
                lifetime_epsilon=_finite(self.lifetime_epsilon),
                ledger_head=self.ledger_head or "",
                ledger_seq=int(self.ledger_seq or 0),
            )
        return metrics, fields

    @classmethod
    def from_wire_values(
        cls,
        metrics: Mapping[str, Any],
        fields: Mapping[str, Any],
        state: AdapterState,
        bytes_sent: int,
    ) -> SiteReport:
        """A received training reply's metrics and fields as a ``SiteReport`` holding
        ``state``; ``ValueError`` naming an unknown or missing key (a DP reply must carry
        every DP field)."""
        check_keys(cls.KIND, "metric", metrics, cls.METRICS)
        check_keys(cls.KIND, "field", fields, cls.FIELDS)
        m, info = metrics, fields
        segment = None
        if info.get("dp"):
            dp = {k: v for k, v in info.items() if k in cls.DP_FIELDS}
            check_keys(cls.KIND + " under DP", "field", dp, cls.DP_FIELDS)
            segment = Segment(float(info["q"]), float(info["sigma"]), int(info["dp_steps"]))
        loss = float(m["train-loss"])
        return cls(
            site=str(info["site"]),
            state=state,
            num_examples=int(m["num-examples"]),
            train_loss=loss if loss >= 0 else math.nan,
            steps=int(m["steps"]),
            seconds=float(m["seconds"]),
            privacy_seconds=float(m.get("privacy-seconds", 0.0)),
            bytes_sent=bytes_sent,
            segment=segment,
            epsilon=float(info["epsilon"]) if segment else None,
            delta=float(info["delta"]) if segment else None,
            accountant=str(info["accountant"]) if segment else None,
            max_grad_norm=float(info["max_grad_norm"]) if segment else None,
            lifetime_epsilon=float(info["lifetime_epsilon"]) if segment else None,
            ledger_head=str(info["ledger_head"]) if segment else None,
            ledger_seq=(int(info.get("ledger_seq", 0)) or None) if segment else None,
        )


@dataclass(frozen=True)
class SiteEval:
    """One site's evaluation of the global adapter on its held-out split. ``withheld`` (no
    numbers: loss and accuracy NaN, 0 examples) says why the site sent none: it holds fewer
    evaluation records than its policy's ``min_eval_records``."""

    site: str
    loss: float
    accuracy: float
    num_examples: int
    withheld: str | None = None

    KIND: ClassVar[str] = "evaluation reply"
    METRICS: ClassVar[dict[str, WireKey]] = _keys(
        NUM_EXAMPLES,
        WireKey("eval-loss", (float,), "mean loss of the global adapter on the held-out split"),
        WireKey("eval-accuracy", (float,), "accuracy of the global adapter on the held-out split"),
    )
    FIELDS: ClassVar[dict[str, WireKey]] = _keys(
        SITE,
        WireKey(
            "withheld",
            (str,),
            "an evaluation sent without numbers, and why (min_eval_records)",
            False,
        ),
    )

    @classmethod
    def withheld_by(cls, site: str, reason: str) -> SiteEval:
        """An evaluation the site sent without numbers, for ``reason``."""
        return cls(site, math.nan, math.nan, 0, reason)

    def wire_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The metrics and fields the site sends: a withheld evaluation sends no metrics."""
        if self.withheld is not None:
            return {}, {"site": self.site, "withheld": self.withheld}
        metrics = {
            "num-examples": self.num_examples,
            "eval-loss": self.loss,
            "eval-accuracy": self.accuracy,
        }
        return metrics, {"site": self.site}

    @classmethod
    def from_wire_values(
        cls, metrics: Mapping[str, Any] | None, fields: Mapping[str, Any]
    ) -> SiteEval:
        """A received evaluation; ``metrics`` is None when the reply has no metric record
        (a withheld evaluation). ``ValueError`` naming an unknown or missing key."""
        check_keys(cls.KIND, "field", fields, cls.FIELDS)
        if fields.get("withheld") is not None:
            # the site sent no numbers: too few evaluation records for its policy
            return cls.withheld_by(str(fields["site"]), str(fields["withheld"]))
        if metrics is None:
            raise ValueError(f"{cls.KIND}: it carries no metrics and is not withheld")
        check_keys(cls.KIND, "metric", metrics, cls.METRICS)
        return cls(
            str(fields["site"]),
            float(metrics["eval-loss"]),
            float(metrics["eval-accuracy"]),
            int(metrics["num-examples"]),
        )


@dataclass(frozen=True)
class Refusal:
    """A site's refusal of a message: its name and its own policy's reasons; no tensors and
    no metrics."""

    site: str
    reasons: list[str]

    KIND: ClassVar[str] = "refusal"
    FIELDS: ClassVar[dict[str, WireKey]] = _keys(
        SITE,
        WireKey("refused", (bool,), "marks the reply as a refusal"),
        WireKey("reasons", (list,), "the site's own policy reasons (strings)"),
    )

    def wire_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The (no) metrics and the fields the site sends."""
        return {}, {"site": self.site, "refused": True, "reasons": self.reasons}

    @classmethod
    def from_wire_values(cls, fields: Mapping[str, Any]) -> Refusal:
        """A received refusal; ``ValueError`` naming an unknown or missing key."""
        check_keys(cls.KIND, "field", fields, cls.FIELDS)
        return cls(str(fields["site"]), [str(r) for r in fields["reasons"]])


# The replies a site may send outside secure aggregation's own protocol messages
REPLIES: tuple[type[SiteReport] | type[SiteEval] | type[Refusal], ...] = (
    SiteReport,
    Refusal,
    SiteEval,
)


@dataclass(frozen=True)
class ProtocolReply:
    """How a secure-aggregation message of a site travels (``fedslm.secagg.messages``): its
    egress kind, the protocol's dataclass, and for each field on the wire the dataclass
    attribute it holds and its protocol type (``int``, ``bytes``, ``list[int]``,
    ``list[bytes]``; the egress guard logs bytes by length and sha256)."""

    kind: str
    message: type
    fields: dict[str, tuple[str, str]]  # wire name -> (attribute, protocol type)

    def types(self) -> dict[str, str]:
        """The wire fields and their protocol types (the egress guard's ``PROTOCOL_FIELDS``)."""
        return {name: kind for name, (_, kind) in self.fields.items()}

    def wire_fields(self, m: object) -> dict[str, Any]:
        """The fields the site sends for the protocol message ``m``."""
        if not isinstance(m, self.message):
            raise TypeError(f"a {self.kind} reply carries a {self.message.__name__}")
        return {
            name: _AS_SENT[kind](getattr(m, attr)) for name, (attr, kind) in self.fields.items()
        }

    def attributes(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The received wire fields ``values`` (already converted) as the dataclass's
        keyword arguments; ``ValueError`` naming a missing field."""
        missing = [name for name in self.fields if name not in values]
        if missing:
            raise ValueError(f"{self.kind} reply: field {missing[0]!r} is missing")
        return {attr: values[name] for name, (attr, _) in self.fields.items()}


_AS_SENT: dict[str, Any] = {
    "int": int,
    "bytes": bytes,
    "list[int]": lambda v: [int(x) for x in v],
    "list[bytes]": lambda v: [bytes(x) for x in v],
}

# Under secure aggregation the training reply carries the site's key advert in its fields
ADVERT = ProtocolReply(
    "train-secure",
    KeyAdvert,
    {
        "secagg_site_id": ("site_id", "int"),
        "cipher_pk": ("cipher_pk", "bytes"),
        "mask_pk": ("mask_pk", "bytes"),
    },
)
ADVERT_FIELDS: dict[str, str] = ADVERT.types()
# The replies to the protocol's later stages, by the stage the coordinator asked for; the
# masked input also carries its ring vector (``MASKED_VECTOR``), beside the fields
PROTOCOL_REPLIES: dict[str, ProtocolReply] = {
    "share-keys": ProtocolReply(
        "secagg-shares",
        EncryptedShares,
        {
            "site_id": ("sender", "int"),
            "recipients": ("recipients", "list[int]"),
            "ciphertexts": ("ciphertexts", "list[bytes]"),
        },
    ),
    "masked-input": ProtocolReply("secagg-masked", MaskedInput, {"site_id": ("site_id", "int")}),
    "unmask": ProtocolReply(
        "secagg-unmask",
        UnmaskShares,
        {
            "site_id": ("site_id", "int"),
            "self_mask_owners": ("self_mask_owners", "list[int]"),
            "self_mask_shares": ("self_mask_shares", "list[bytes]"),
            "key_owners": ("key_owners", "list[int]"),
            "key_shares": ("key_shares", "list[bytes]"),
        },
    ),
}
MASKED_VECTOR = "masked"  # the one vector a secagg-masked message carries


def reply_metrics() -> dict[str, WireKey]:
    """Every metric key some reply declares (a key two replies share is declared once)."""
    return {k: v for cls in REPLIES for k, v in getattr(cls, "METRICS", {}).items()}


def reply_fields() -> dict[str, WireKey]:
    """Every field key some reply declares."""
    out: dict[str, WireKey] = {}
    for cls in REPLIES:
        for k, v in cls.FIELDS.items():
            out.setdefault(k, v)
    return out


def _required(x: float | None, name: str) -> float:
    # a reply under DP names its delta and clipping norm: without them no one can check it
    if x is None:
        raise ValueError(f"a training reply under DP needs {name!r}")
    return float(x)


def _finite(x: float | None) -> float:
    # -1 stands for "not available" on the wire, where NaN and inf are not allowed
    return float(x) if x is not None and math.isfinite(x) else -1.0


# -- what the coordinator sends -------------------------------------------------------------

ROUND = WireKey("round", (int,), "the round the message belongs to")
QUIET = WireKey("quiet", (bool,), "whether the site prints step progress", False)
# a train message's copy of the site's last ledger head the coordinator anchored
ANCHOR_SEQ, ANCHOR_HASH = "ledger-anchor-seq", "ledger-anchor-hash"
_HASH = re.compile(r"[0-9a-f]{64}")


def anchor_config(anchor: Anchor | None) -> dict[str, Any]:
    """The config entries that tell a site the ledger head its coordinator anchored for it
    (none while it anchors none)."""
    if anchor is None or anchor.seq is None:
        return {}
    return {ANCHOR_SEQ: int(anchor.seq), ANCHOR_HASH: anchor.hash}


def config_anchor(config: Mapping[str, Any], round_num: int) -> Anchor | None:
    """The ledger head a train message says the coordinator anchored for this site (None:
    it sent none). Raises ``ValueError`` naming the key for a malformed one: a site cannot
    check its ledger against a head it cannot read, and does not train unchecked."""
    seq, head = config.get(ANCHOR_SEQ), config.get(ANCHOR_HASH)
    if seq is None and head is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(
            f"config {ANCHOR_SEQ!r} must be the seq of a ledger entry (an integer >= 1) sent "
            f"together with {ANCHOR_HASH!r}, got {seq!r}"
        )
    if not isinstance(head, str) or not _HASH.fullmatch(head):
        raise ValueError(
            f"config {ANCHOR_HASH!r} must be the hash of ledger entry seq {seq} (64 lowercase "
            f"hex digits) sent together with {ANCHOR_SEQ!r}, got {head!r}"
        )
    return Anchor(seq, head, f"the coordinator's train message for round {round_num}")


@dataclass(frozen=True)
class TrainInstruction:
    """What a train message's config says about the round: its number, whether the site
    prints progress, the earlier round whose global adapter the site evaluates first
    (``evaluate_round``, every round of a run but its first), and the ledger head the
    coordinator anchored for the site.

    The config also carries the job's own keys (read by the site's app or worker, not here).
    """

    round: int
    quiet: bool = False
    evaluate_round: int | None = None
    anchor: Anchor | None = None

    EVALUATE_ROUND: ClassVar[WireKey] = WireKey(
        "evaluate-round", (int,), "the round whose global adapter the site evaluates", False
    )
    CONFIG: ClassVar[dict[str, WireKey]] = _keys(
        ROUND,
        QUIET,
        EVALUATE_ROUND,
        WireKey(ANCHOR_SEQ, (int,), "seq of the ledger head anchored for the site", False),
        WireKey(ANCHOR_HASH, (str,), "hash of that ledger head", False),
    )

    def to_config(self) -> dict[str, Any]:
        """The config entries of this instruction."""
        config: dict[str, Any] = {ROUND.name: self.round, QUIET.name: self.quiet}
        if self.evaluate_round is not None:
            config[self.EVALUATE_ROUND.name] = self.evaluate_round
        return {**config, **anchor_config(self.anchor)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainInstruction:
        """Read from a train message's config; ``ValueError`` naming a malformed anchor,
        ``KeyError`` without a round."""
        round_num = int(config[ROUND.name])
        evaluated = config.get(cls.EVALUATE_ROUND.name)
        return cls(
            round_num,
            bool(config.get(QUIET.name, False)),
            None if evaluated is None else int(evaluated),
            config_anchor(config, round_num),
        )


@dataclass(frozen=True)
class EvalInstruction:
    """What an evaluate message's config says: the round (0 when it names none) and
    whether the site prints progress."""

    round: int = 0
    quiet: bool = False

    CONFIG: ClassVar[dict[str, WireKey]] = _keys(ROUND, QUIET)

    def to_config(self) -> dict[str, Any]:
        """The config entries of this instruction."""
        return {ROUND.name: self.round, QUIET.name: self.quiet}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EvalInstruction:
        """Read from an evaluate message's config."""
        return cls(int(config.get(ROUND.name, 0)), bool(config.get(QUIET.name, False)))


@dataclass(frozen=True)
class StageInstruction:
    """What a secure-aggregation query's config says: the round, the protocol stage
    (``share-keys``, ``masked-input`` or ``unmask``) and whether the site prints progress.
    The stage's request travels beside it (``fedslm.secagg.messages``)."""

    round: int
    stage: str
    quiet: bool = False

    STAGE: ClassVar[WireKey] = WireKey("stage", (str,), "the secure-aggregation stage")
    CONFIG: ClassVar[dict[str, WireKey]] = _keys(ROUND, STAGE, QUIET)

    def to_config(self) -> dict[str, Any]:
        """The config entries of this instruction."""
        return {ROUND.name: self.round, self.STAGE.name: self.stage, QUIET.name: self.quiet}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StageInstruction:
        """Read from a query's config; ``KeyError`` without a stage or round."""
        return cls(
            int(config[ROUND.name]),
            str(config[cls.STAGE.name]),
            bool(config.get(QUIET.name, False)),
        )


# a simulated job's messages name the job's manifest (``fedslm.job.PreparedJob``) instead
MANIFEST = WireKey("manifest", (str,), "path of the simulated job's manifest")


@dataclass(frozen=True)
class DeployedJob:
    """What every message of a deployed job carries in its config besides the round's own
    keys: the job itself (each site validates it against its own policy), its id, the base
    model's hash and the coordinator's versions (``server.app.deployed_config`` sends it, the
    site worker reads it: ``fedslm.clients.worker``)."""

    job: str  # the JobConfig as JSON
    job_id: str
    model_sha256: str
    fedslm_version: str
    flwr_version: str

    JOB: ClassVar[WireKey] = WireKey("job", (str,), "the job config as JSON")
    JOB_ID: ClassVar[WireKey] = WireKey("job-id", (str,), "the job's id (it names folders)")
    CONFIG: ClassVar[dict[str, WireKey]] = _keys(
        JOB,
        JOB_ID,
        WireKey("model-sha256", (str,), "sha256 of the coordinator's base model weights"),
        WireKey("fedslm-version", (str,), "the coordinator's fedslm version"),
        WireKey("flwr-version", (str,), "the coordinator's Flower version"),
    )

    def to_config(self) -> dict[str, Any]:
        """The config entries of a deployed job's messages."""
        values = (self.job, self.job_id, self.model_sha256, self.fedslm_version, self.flwr_version)
        return dict(zip(self.CONFIG, values, strict=True))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DeployedJob:
        """Read from a message's config; ``ValueError`` naming the keys that are missing, or
        that are not strings."""
        missing = [k for k in cls.CONFIG if k not in config]
        if missing:
            raise ValueError(f"the message config lacks {missing} (a deployed job sends them)")
        wrong = [k for k in cls.CONFIG if not isinstance(config[k], str)]
        if wrong:
            raise ValueError(f"config {wrong} must be strings")
        return cls(*(str(config[k]) for k in cls.CONFIG))
