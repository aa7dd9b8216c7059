"""Encoding of what a site sends and receives as Flower records, and back.

Kept apart from the ClientApp so that the coordinator decodes with the same definitions.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedslm.coordinator import SiteEval, SiteReport
from fedslm.egress import Payload
from fedslm.privacy.accounting import Segment


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> float32 tensors (a copy: Flower's buffers are read-only)."""
    return {k: v.to(torch.float32).clone() for k, v in record.to_torch_state_dict().items()}


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """float32 tensors -> ArrayRecord (Flower rejects bfloat16; fp16 would average in fp16)."""
    return ArrayRecord(torch_state_dict={k: v.to(torch.float32) for k, v in state.items()})


def encode_payload(payload: Payload) -> RecordDict:
    """A site's checked and logged reply (``Site.release``) as Flower records.

    Tensors go in an ArrayRecord, metrics in a MetricRecord and the identifying and DP fields
    in a ConfigRecord: exactly what the egress log recorded, nothing added here.
    """
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    if payload.tensors:
        records["arrays"] = state_to_arrays(payload.tensors)
    if payload.metrics:
        records["metrics"] = MetricRecord(dict(payload.metrics))
    records["site"] = ConfigRecord(dict(payload.fields))
    return RecordDict(records)


def decode_update(content: RecordDict) -> SiteReport:
    """The coordinator's view of a training reply."""
    arrays = content["arrays"]
    m, info = content["metrics"], content["site"]
    segment = None
    if info.get("dp"):
        segment = Segment(float(info["q"]), float(info["sigma"]), int(info["dp_steps"]))
    loss = float(m["train-loss"])
    return SiteReport(
        site=str(info["site"]),
        state=arrays_to_state(arrays),
        num_examples=int(m["num-examples"]),
        train_loss=loss if loss >= 0 else math.nan,
        steps=int(m["steps"]),
        seconds=float(m["seconds"]),
        privacy_seconds=float(m.get("privacy-seconds", 0.0)),
        bytes_sent=arrays.count_bytes() + m.count_bytes() + info.count_bytes(),
        segment=segment,
        epsilon=float(info["epsilon"]) if segment else None,
        delta=float(info["delta"]) if segment else None,
        accountant=str(info["accountant"]) if segment else None,
        max_grad_norm=float(info["max_grad_norm"]) if segment else None,
        lifetime_epsilon=float(info["lifetime_epsilon"]) if segment else None,
        ledger_head=str(info["ledger_head"]) if segment else None,
    )


def decode_refusal(content: RecordDict) -> tuple[str, list[str]] | None:
    """``(site, reasons)`` if ``content`` is a refusal, else None."""
    info = content.get("site")
    if not isinstance(info, ConfigRecord) or not info.get("refused"):
        return None
    return str(info["site"]), [str(r) for r in info["reasons"]]


def decode_eval(content: RecordDict) -> SiteEval:
    """The coordinator's view of an evaluation reply."""
    m = content["metrics"]
    return SiteEval(
        str(content["site"]["site"]),
        float(m["eval-loss"]),
        float(m["eval-accuracy"]),
        int(m["num-examples"]),
    )
