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
- bytes: at most the site policy's ``max_bytes_per_round``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# numeric metrics a site may report, and what they mean
ALLOWED_METRICS: dict[str, str] = {
    "num-examples": "training (or evaluation) records",
    "train-loss": "mean training loss of the round",
    "steps": "local optimizer steps",
    "seconds": "local training time",
    "privacy-seconds": "time spent on policy, ledger and accounting",
    "eval-loss": "mean loss of the global adapter on the held-out split",
    "eval-accuracy": "accuracy of the global adapter on the held-out split",
}
# identifying and DP fields, with the types they may have
ALLOWED_FIELDS: dict[str, tuple[type, ...]] = {
    "site": (str,),
    "dp": (bool,),
    "q": (float,),
    "sigma": (float,),
    "dp_steps": (int,),
    "epsilon": (float,),
    "delta": (float,),
    "accountant": (str,),
    "max_grad_norm": (float,),
    "lifetime_epsilon": (float,),
    "ledger_head": (str,),
    "refused": (bool,),
    "reasons": (list,),  # list[str]: the site's own policy reasons
}
DTYPE = "float32"


@dataclass(frozen=True)
class Payload:
    """One message from a site, before it is encoded for the network."""

    kind: str  # "train", "evaluate" or "refusal"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


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


def describe(payload: Payload) -> dict[str, Any]:
    """The egress record of ``payload``: JSON-ready, what the ledger keeps and reports show."""
    tensors = [asdict(tensor_record(k, v)) for k, v in sorted(payload.tensors.items())]
    return {
        "kind": payload.kind,
        "tensors": tensors,
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "metrics": dict(sorted(payload.metrics.items())),
        "fields": dict(sorted(payload.fields.items())),
    }


def check(
    record: dict[str, Any], expected: dict[str, tuple[int, ...]], max_bytes: int | None
) -> list[str]:
    """Why ``record`` (from ``describe``) may not leave; empty means it may.

    ``expected`` maps each adapter tensor the job agreed to its shape. A training reply must
    carry exactly those tensors; other replies carry none.
    """
    problems: list[str] = []
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
    return problems
