"""Encoding of what a site sends and receives as Flower records, and back.

Shared by the ClientApp and the ServerApp (``fedslm.wire``, neither side's package): the
messages and their keys are declared once, in ``fedslm.messages``; this module only puts them
into records and takes them out. A reply's records: ``arrays`` (the adapter), ``metrics`` (a
MetricRecord), ``site`` (a ConfigRecord of the identifying and DP fields), and ``vectors``
(secure aggregation's masked vector).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedslm.egress import Payload
from fedslm.messages import (
    ADVERT,
    ADVERT_FIELDS,
    MASKED_VECTOR,
    PROTOCOL_REPLIES,
    ProtocolReply,
    Refusal,
    SiteEval,
    SiteReport,
)
from fedslm.secagg.messages import KeyAdvert, MaskedInput

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
ADAPTER = "adapter"  # the one array of an adapter's ArrayRecord
ORDER = "fedslm.order"  # safetensors metadata: the tensor names in the sender's order
# A training reply that also carries the site's evaluation of the adapter it received holds
# that evaluation's records under these names ("eval-metrics", "eval-site")
EVAL_PREFIX = "eval-"
_U64 = 2**64


def to_wire(value: Any) -> Any:
    """Flower node ids (our secure-aggregation site ids) are uint64; ConfigRecord ints travel
    as sint64, so ids of 2^63 and above are sent as their two's-complement negative."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value - _U64 if value >= 2**63 else value
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    return value


def from_wire(value: Any) -> Any:
    """Inverse of ``to_wire`` for site ids (every id is positive, so a negative is wrapped)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value + _U64 if value < 0 else value
    if isinstance(value, list):
        return [from_wire(v) for v in value]
    return value


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """float32 tensors -> an ArrayRecord holding one array: the tensors as one safetensors
    blob (names, shapes, dtypes and data), float32 because fp16 would average in fp16.

    One array, not one per tensor: Flower sends every array as two objects, each its own
    request to the SuperLink and the SuperNode, and a deployed round paid ~0.1 s per request
    (docs/benchmarks.md, section 11); an adapter of 40 tensors was 80 of them per message.
    """
    blob = save_tensors(
        {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()},
        metadata={ORDER: json.dumps(list(state))},  # safetensors itself keeps no order
    )
    return ArrayRecord(OrderedDict([(ADAPTER, Array(np.frombuffer(blob, dtype=np.uint8)))]))


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of ``state_to_arrays``; ``ValueError`` saying what is wrong for anything that
    is not one safetensors blob of float32 tensors."""
    if list(record.keys()) != [ADAPTER]:
        raise ValueError(
            f"expected one array {ADAPTER!r} (the adapter as safetensors), got {list(record)}"
        )
    blob = record[ADAPTER].numpy()
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"array {ADAPTER!r} must be 1-D uint8, got {blob.dtype} {blob.shape}")
    data = blob.tobytes()
    try:
        tensors = load_tensors(data)
        # the header: 8 bytes of length (little-endian), then JSON with the metadata
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        order = json.loads(header["__metadata__"][ORDER])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"array {ADAPTER!r} is not an adapter in safetensors: {exc}") from None
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(tensors):
        raise ValueError(f"array {ADAPTER!r}: its tensor order does not list its tensors")
    odd = sorted(k for k, v in tensors.items() if v.dtype != torch.float32)
    if odd:
        raise ValueError(f"adapter tensors must be float32; not: {', '.join(odd[:5])}")
    return {k: tensors[k] for k in order}


def encode_payload(payload: Payload, prefix: str = "") -> RecordDict:
    """A site's checked and logged reply (``Site.release``) as Flower records.

    Tensors go in an ArrayRecord, metrics in a MetricRecord and the identifying and DP fields
    in a ConfigRecord: exactly what the egress log recorded, nothing added here. ``prefix``
    goes before each record's name (``EVAL_PREFIX``: an evaluation joined to a training reply
    with ``join_replies``).
    """
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    if payload.tensors:
        records[prefix + "arrays"] = state_to_arrays(payload.tensors)
    if payload.vectors:
        records[prefix + "vectors"] = ArrayRecord(
            OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in payload.vectors.items())
        )
    if payload.metrics:
        records[prefix + "metrics"] = MetricRecord(dict(payload.metrics))
    records[prefix + "site"] = ConfigRecord({k: to_wire(v) for k, v in payload.fields.items()})
    return RecordDict(records)


def join_replies(evaluation: RecordDict, reply: RecordDict) -> RecordDict:
    """One message for two released payloads: ``reply`` (training) and ``evaluation``
    (encoded with ``EVAL_PREFIX``). Each was checked and logged on its own."""
    if any(not k.startswith(EVAL_PREFIX) for k in evaluation) or set(evaluation) & set(reply):
        raise ValueError("an evaluation to join must be encoded with EVAL_PREFIX")
    return RecordDict({**dict(reply.items()), **dict(evaluation.items())})


def message_to_config(m: DataclassInstance) -> ConfigRecord:
    """A secure-aggregation message (ints, bytes and lists of them) as a ConfigRecord."""
    return ConfigRecord({f.name: to_wire(getattr(m, f.name)) for f in dataclass_fields(m)})


def config_to_message(cls: type[T], record: ConfigRecord) -> T:
    """Inverse of ``message_to_config`` for the dataclass ``cls``."""
    values = {f.name: from_wire(record[f.name]) for f in dataclass_fields(cls)}
    return cls(**values)


def arrays_of(content: RecordDict, name: str) -> ArrayRecord:
    """``content``'s ArrayRecord ``name``; ``ValueError`` naming it when there is none."""
    return _record(content, name, ArrayRecord)


def metrics_of(content: RecordDict, name: str) -> MetricRecord:
    """``content``'s MetricRecord ``name``; ``ValueError`` naming it when there is none."""
    return _record(content, name, MetricRecord)


def config_of(content: RecordDict, name: str) -> ConfigRecord:
    """``content``'s ConfigRecord ``name``; ``ValueError`` naming it when there is none."""
    return _record(content, name, ConfigRecord)


R = TypeVar("R", ArrayRecord, MetricRecord, ConfigRecord)


def _record(content: RecordDict, name: str, kind: type[R]) -> R:
    record = content.get(name)
    if record is None:
        raise ValueError(f"the message has no record {name!r}")
    if not isinstance(record, kind):
        raise ValueError(f"record {name!r} is a {type(record).__name__}, not a {kind.__name__}")
    return record


def decode_secure_update(content: RecordDict) -> tuple[SiteReport, KeyAdvert]:
    """The coordinator's view of a training reply under secure aggregation: the metrics and DP
    fields (no adapter) and the site's key advert (``ADVERT``, beside the fields)."""
    if "arrays" in content:
        raise ValueError("a training reply under secure aggregation must carry no tensors")
    info = config_of(content, "site")
    advert = _protocol_message(ADVERT, info)
    return _report(content, {}, 0), advert


def decode_protocol_reply(stage: str, content: RecordDict) -> object:
    """A site's reply to a secure-aggregation stage, as the protocol's message."""
    reply = PROTOCOL_REPLIES.get(stage)
    if reply is None:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    info = config_of(content, "site")
    unknown = sorted(k for k in info if k not in reply.fields)
    if unknown:
        raise ValueError(f"{reply.kind} reply: field {unknown[0]!r} is not part of the message")
    if reply.message is MaskedInput:
        vector = arrays_of(content, "vectors")[MASKED_VECTOR].numpy()
        values = reply.attributes(_received(reply, info))
        return MaskedInput(**values, vector=np.array(vector, copy=True))
    return _protocol_message(reply, info)


# a received protocol field, by its protocol type: ids come back from their sint64 form
_AS_RECEIVED: dict[str, Callable[[Any], Any]] = {
    "int": lambda v: from_wire(int(v)),
    "bytes": bytes,
    "list[int]": lambda v: from_wire(list(v)),
    "list[bytes]": lambda v: [bytes(b) for b in v],
}


def _received(reply: ProtocolReply, info: ConfigRecord) -> dict[str, Any]:
    return {k: _AS_RECEIVED[kind](info[k]) for k, kind in reply.types().items() if k in info}


def _protocol_message(reply: ProtocolReply, info: ConfigRecord) -> Any:
    return reply.message(**reply.attributes(_received(reply, info)))


def decode_update(content: RecordDict) -> SiteReport:
    """The coordinator's view of a training reply."""
    arrays = arrays_of(content, "arrays")
    return _report(content, arrays_to_state(arrays), arrays.count_bytes())


def _report(content: RecordDict, state: dict, array_bytes: int) -> SiteReport:
    """A training reply's metrics and DP fields as a ``SiteReport`` holding ``state``;
    ``array_bytes`` is what its tensors took on the wire."""
    m, info = metrics_of(content, "metrics"), config_of(content, "site")
    fields = {k: v for k, v in info.items() if k not in ADVERT_FIELDS}
    bytes_sent = array_bytes + m.count_bytes() + info.count_bytes()
    return SiteReport.from_wire_values(m, fields, state, bytes_sent)


def decode_refusal(content: RecordDict, prefix: str = "") -> Refusal | None:
    """The refusal ``content`` (its records named with ``prefix``) holds, else None."""
    info = content.get(prefix + "site")
    if not isinstance(info, ConfigRecord) or not info.get("refused"):
        return None
    return Refusal.from_wire_values(info)


def decode_eval(content: RecordDict, prefix: str = "") -> SiteEval:
    """The coordinator's view of an evaluation reply, or with ``prefix=EVAL_PREFIX`` of the
    evaluation a training reply carries."""
    info = config_of(content, prefix + "site")
    name = prefix + "metrics"
    metrics = metrics_of(content, name) if name in content else None
    return SiteEval.from_wire_values(metrics, info)
