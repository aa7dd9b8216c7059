"""What a site sends, described and checked before it leaves: the egress guard.

Pure functions of tensors and numbers. A reply is a ``Payload``: adapter tensors, numeric
metrics, and a few typed fields that identify the site and its DP segment. Before anything
leaves, the site checks the payload (``check``) and records its description (``describe``) in
its ledger (``fedslm.privacy.egress_log``); a payload that fails the check is blocked, logged,
and answered with a refusal instead.

Only what the job agreed may leave:

- tensors: exactly the names, shapes and dtype (float32) of the adapter the site built from the
  job it accepted (LoRA factors and the task head), nothing else;
- metrics: finite numbers under the keys in ``ALLOWED_METRICS``;
- fields: the keys in ``ALLOWED_FIELDS``, each of its type (strings only where listed);
  both lists are what the messages of ``fedslm.messages`` declare;
- bytes: at most the site policy's ``max_bytes_per_round``;
- size: at most ``max_trainable_fraction`` of the base model's parameters, counted from the
  shapes of what actually leaves (tensors and ring vectors), not from the job's description;
- evaluation metrics only over at least the policy's ``min_eval_records`` records; an
  evaluation marked ``withheld`` carries no metrics at all.

Under secure aggregation (``fedslm.secagg``) a site sends five kinds of message per round, each
with exactly the protocol's contents (``PROTOCOL_FIELDS``) and no adapter tensor:
``train-secure`` (the usual metrics and DP fields plus the key advert), ``secagg-shares``
(ciphertexts for the other sites), ``secagg-masked`` (one ring vector of the agreed length and
dtype), ``secagg-unmask`` (Shamir shares). Byte strings (keys, ciphertexts, shares) are logged
by length and sha256, never by content.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fedslm.messages import (
    ADVERT,
    ADVERT_FIELDS,
    MASKED_VECTOR,
    PROTOCOL_REPLIES,
    reply_fields,
    reply_metrics,
)

# numeric metrics a site may report, and what they mean, and its identifying and DP fields with
# the types they may have: exactly what the messages (``fedslm.messages``) declare
ALLOWED_METRICS: dict[str, str] = {k: key.meaning for k, key in reply_metrics().items()}
ALLOWED_FIELDS: dict[str, tuple[type, ...]] = {k: key.types for k, key in reply_fields().items()}
DTYPE = "float32"

# the protocol messages: exactly these fields, of these types ("bytes" and "list[bytes]" are
# logged as {"bytes": n, "sha256": h}), as ``fedslm.messages`` declares them; train-secure
# adds the key advert to the train fields
_ADVERT = ADVERT_FIELDS
PROTOCOL_FIELDS: dict[str, dict[str, str]] = {r.kind: r.types() for r in PROTOCOL_REPLIES.values()}
SECURE_TRAIN = ADVERT.kind


@dataclass(frozen=True)
class Payload:
    """One message from a site, before it is encoded for the network."""

    kind: str  # "train", "evaluate", "refusal", "train-secure" or a PROTOCOL_FIELDS kind
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    # integer ring vectors of secure aggregation (secagg-masked only); never adapter values
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class RingSpec:
    """What a masked vector must look like: ``length`` elements of ``dtype`` (e.g. "<u4")."""

    length: int
    dtype: str


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as it leaves: name, shape, dtype, size and content hash (never values)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    sha256: str


def tensor_record(name: str, t: torch.Tensor) -> TensorRecord:
    """Describe ``t`` as it would be sent (C-contiguous bytes in its own dtype)."""
    data = t.detach().to("cpu").contiguous()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return TensorRecord(
        name, tuple(data.shape), str(data.dtype).removeprefix("torch."), len(raw),
        hashlib.sha256(raw).hexdigest(),
    )  # fmt: skip


def _bytes_record(b: bytes) -> dict[str, Any]:
    return {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}


def _describe_field(value: Any) -> Any:
    # keys, ciphertexts and shares are logged by size and hash: the log is no second copy
    if isinstance(value, bytes | bytearray):
        return _bytes_record(bytes(value))
    if isinstance(value, list) and any(isinstance(v, bytes | bytearray) for v in value):
        return [_bytes_record(bytes(v)) if isinstance(v, bytes | bytearray) else v for v in value]
    return value


def _is_bytes_record(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"bytes", "sha256"}


def vector_record(name: str, v: np.ndarray) -> dict[str, Any]:
    """Describe a ring vector as it would be sent: name, shape, dtype, bytes, sha256."""
    raw = np.ascontiguousarray(v).tobytes()
    return {
        "name": name,
        "shape": list(v.shape),
        "dtype": v.dtype.str,
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def describe(payload: Payload) -> dict[str, Any]:
    """The egress record of ``payload``: JSON-ready, what the ledger keeps and reports show."""
    tensors = [asdict(tensor_record(k, v)) for k, v in sorted(payload.tensors.items())]
    record: dict[str, Any] = {
        "kind": payload.kind,
        "tensors": tensors,
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "metrics": dict(sorted(payload.metrics.items())),
        "fields": {k: _describe_field(v) for k, v in sorted(payload.fields.items())},
    }
    if payload.vectors:
        vectors = [vector_record(k, v) for k, v in sorted(payload.vectors.items())]
        record["vectors"] = vectors
        record["tensor_bytes"] += sum(v["bytes"] for v in vectors)
    return record


def check(
    record: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
    max_bytes: int | None,
    ring: RingSpec | None = None,
    *,
    max_params: int | None = None,
    min_eval_records: int | None = None,
) -> list[str]:
    """Why ``record`` (from ``describe``) may not leave; empty means it may.

    ``expected`` maps each adapter tensor the job agreed to its shape. A training reply must
    carry exactly those tensors; other replies carry none. Protocol messages of secure
    aggregation are checked by ``check_protocol`` against ``ring``. ``max_params`` bounds the
    values of all tensors and vectors together (the policy's share of the base model);
    ``min_eval_records`` the records an evaluation's metrics may be computed on.
    """
    kind = record["kind"]
    if kind in PROTOCOL_FIELDS:
        problems = check_protocol(record, ring)
        if max_bytes is not None and record["tensor_bytes"] > max_bytes:
            problems.append(
                f"{record['tensor_bytes']:,} bytes of vectors; the site policy allows "
                f"{max_bytes:,} per round"
            )
        return problems + _size_problems(record, max_params)
    problems = []
    if record.get("vectors"):
        problems.append(f"a {kind} message carries no ring vectors")
    fields = record["fields"]
    if kind == SECURE_TRAIN:
        # the key advert rides on the training reply; the rest is checked as a train reply's
        advert = {k: v for k, v in fields.items() if k in _ADVERT}
        problems += _check_fields(advert, _ADVERT, required=True)
        fields = {k: v for k, v in fields.items() if k not in _ADVERT}
        if record["tensors"]:
            problems.append(
                "a training reply under secure aggregation carries no tensors, it has "
                f"{[t['name'] for t in record['tensors']][:3]}"
            )
        record = {**record, "tensors": [], "fields": fields}
    names = {t["name"] for t in record["tensors"]}
    if record["kind"] == "train":
        missing = sorted(set(expected) - names)
        if missing:
            problems.append(f"adapter tensors missing: {missing[:3]}")
    for t in record["tensors"]:
        name = t["name"]
        if record["kind"] != "train" or name not in expected:
            problems.append(f"tensor {name!r} is not part of the agreed adapter")
        elif tuple(t["shape"]) != tuple(expected[name]):
            problems.append(
                f"tensor {name!r} has shape {tuple(t['shape'])}, the agreed adapter has "
                f"{tuple(expected[name])}"
            )
        elif t["dtype"] != DTYPE:
            problems.append(f"tensor {name!r} is {t['dtype']}, not {DTYPE}")
    for key, value in record["metrics"].items():
        if key not in ALLOWED_METRICS:
            problems.append(f"metric {key!r} is not on the allow-list")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"metric {key!r} is {type(value).__name__}, not a number")
        elif not math.isfinite(value):
            problems.append(f"metric {key!r} is not finite")
    for key, value in record["fields"].items():
        types = ALLOWED_FIELDS.get(key)
        if types is None:
            problems.append(f"field {key!r} is not on the allow-list")
        elif not isinstance(value, types) or (
            isinstance(value, list) and not all(isinstance(v, str) for v in value)
        ):
            problems.append(f"field {key!r} has type {type(value).__name__}")
    if max_bytes is not None and record["tensor_bytes"] > max_bytes:
        problems.append(
            f"{record['tensor_bytes']:,} bytes of tensors; the site policy allows "
            f"{max_bytes:,} per round"
        )
    if record["kind"] == "evaluate":
        problems += _evaluation_problems(record, min_eval_records)
    return problems + _size_problems(record, max_params)


def _size_problems(record: dict[str, Any], max_params: int | None) -> list[str]:
    # counted from the shapes that leave: a job cannot declare its way past the bound. A masked
    # vector holds the update and one more element, the site's weight in the sum.
    vectors = record.get("vectors", [])
    shapes = [t["shape"] for t in record["tensors"]] + [v["shape"] for v in vectors]
    values = sum(math.prod(shape) for shape in shapes) - len(vectors)
    if max_params is None or values <= max_params:
        return []
    return [
        f"{values:,} values; the site policy's max_trainable_fraction allows {max_params:,} "
        "(that share of the base model's parameters)"
    ]


def _evaluation_problems(record: dict[str, Any], min_records: int | None) -> list[str]:
    metrics, fields = record["metrics"], record["fields"]
    if "withheld" in fields:
        return ["a withheld evaluation carries no metrics"] if metrics else []
    examples = metrics.get("num-examples")
    if min_records is not None and (not isinstance(examples, int) or examples < min_records):
        return [
            f"evaluation metrics over {examples} record(s); the site policy's "
            f"min_eval_records is {min_records}"
        ]
    return []


def check_protocol(record: dict[str, Any], ring: RingSpec | None) -> list[str]:
    """Why a secure-aggregation message may not leave: it must hold exactly its kind's fields
    (``PROTOCOL_FIELDS``), no metrics, no tensors, and (secagg-masked only) exactly one ring
    vector of ``ring``'s length and dtype."""
    kind = record["kind"]
    problems = _check_fields(record["fields"], PROTOCOL_FIELDS[kind], required=True)
    if record["tensors"]:
        problems.append(f"a {kind} message carries no adapter tensors")
    if record["metrics"]:
        problems.append(f"a {kind} message carries no metrics")
    vectors = record.get("vectors", [])
    if kind != "secagg-masked":
        if vectors:
            problems.append(f"a {kind} message carries no vectors")
        return problems
    if ring is None:
        return [*problems, "no masked-vector length agreed for this round"]
    if [v["name"] for v in vectors] != [MASKED_VECTOR]:
        problems.append(f"a secagg-masked message carries exactly one vector {MASKED_VECTOR!r}")
    for v in vectors:
        if v["shape"] != [ring.length] or v["dtype"] != np.dtype(ring.dtype).str:
            problems.append(
                f"vector {v['name']!r} is {v['dtype']} of shape {v['shape']}; the round agreed "
                f"{np.dtype(ring.dtype).str} of shape [{ring.length}]"
            )
    return problems


def _check_fields(fields: dict[str, Any], spec: dict[str, str], *, required: bool) -> list[str]:
    problems = [f"field {k!r} is not part of the protocol" for k in fields if k not in spec]
    for key, kind in spec.items():
        if key not in fields:
            if required:
                problems.append(f"field {key!r} is missing")
            continue
        value = fields[key]
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "bytes": _is_bytes_record,
            "list[int]": lambda v: (
                isinstance(v, list)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            ),
            "list[bytes]": lambda v: isinstance(v, list) and all(_is_bytes_record(x) for x in v),
        }[kind](value)
        if not ok:
            problems.append(f"field {key!r} is not {kind}")
    return problems
