"""Encoding of what a site sends and receives as Flower records, and back.

Kept apart from the ClientApp so that the coordinator decodes with the same definitions.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedslm.coordinator import SiteEval, SiteReport
from fedslm.privacy.accounting import Segment
from fedslm.site import SiteUpdate
from fedslm.training import EvalResult


def arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> float32 tensors (a copy: Flower's buffers are read-only)."""
    return {k: v.to(torch.float32).clone() for k, v in record.to_torch_state_dict().items()}


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """float32 tensors -> ArrayRecord (Flower rejects bfloat16; fp16 would average in fp16)."""
    return ArrayRecord(torch_state_dict={k: v.to(torch.float32) for k, v in state.items()})


def _finite(x: float | None) -> float:
    return float(x) if x is not None and math.isfinite(x) else -1.0


def encode_update(
    site: str, u: SiteUpdate, delta: float, accountant: str, max_grad_norm: float
) -> RecordDict:
    """A training reply: the adapter, numeric metrics, and the site's identity and DP segment."""
    metrics = {
        "num-examples": u.num_examples,
        "train-loss": _finite(u.train_loss),
        "steps": u.steps,
        "seconds": u.seconds,
        "privacy-seconds": u.privacy_seconds,
    }
    info: dict[str, str | int | float | bool] = {"site": site, "dp": u.segment is not None}
    if u.segment is not None and u.epsilon is not None:
        info.update(
            q=u.segment.q,
            sigma=u.segment.sigma,
            dp_steps=u.segment.steps,
            epsilon=u.epsilon,
            delta=delta,
            accountant=accountant,
            max_grad_norm=max_grad_norm,
            lifetime_epsilon=_finite(u.lifetime_epsilon),
            ledger_head=u.ledger_head or "",
        )
    return RecordDict(
        {
            "arrays": state_to_arrays(u.state),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord(info),
        }
    )


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


def encode_refusal(site: str, reasons: list[str]) -> RecordDict:
    """A refusal: the site's name and its policy's reasons; no tensors."""
    info = ConfigRecord({"site": site, "refused": True, "reasons": list(reasons)})
    return RecordDict({"site": info})


def decode_refusal(content: RecordDict) -> tuple[str, list[str]] | None:
    """``(site, reasons)`` if ``content`` is a refusal, else None."""
    info = content.get("site")
    if not isinstance(info, ConfigRecord) or not info.get("refused"):
        return None
    return str(info["site"]), [str(r) for r in info["reasons"]]


def encode_eval(site: str, r: EvalResult) -> RecordDict:
    """An evaluation reply."""
    return RecordDict(
        {
            "metrics": MetricRecord(
                {"num-examples": r.examples, "eval-loss": r.loss, "eval-accuracy": r.accuracy}
            ),
            "site": ConfigRecord({"site": site}),
        }
    )


def decode_eval(content: RecordDict) -> SiteEval:
    """The coordinator's view of an evaluation reply."""
    m = content["metrics"]
    return SiteEval(
        str(content["site"]["site"]),
        float(m["eval-loss"]),
        float(m["eval-accuracy"]),
        int(m["num-examples"]),
    )
