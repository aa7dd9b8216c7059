"""What a coordinator writes under a run's output folder, and reads back to resume it.

``OUT/checkpoints/round-N/`` (the exported adapter, ``server_optimizer.pt`` and the resume
state ``coordinator_state.pt``), ``OUT/metrics.jsonl`` (one line per round, written after the
round's checkpoint: the line is what marks a round complete), ``OUT/privacy.json`` and the final
``OUT/adapter/``. The ``Coordinator`` decides what goes in them; this module only writes and
reads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedslm.artifacts import append_jsonl, jsonl_line, write_json, write_text, write_torch
from fedslm.errors import FederationError
from fedslm.models.adapter import AdapterState, export_adapter
from fedslm.privacy_summary import SitePrivacy
from fedslm.rounds import RoundRecord

RESUME_STATE = "coordinator_state.pt"
OPTIMIZER_STATE = "server_optimizer.pt"


@dataclass
class ResumeState:
    """What ``Coordinator.resume`` needs beyond the exported adapter: the exact float32 global
    state, the per-site privacy record, the (site, round) releases already accounted, and the
    central noise generator's state (coordinator-private: whoever holds it could predict the
    next round's noise)."""

    round: int
    state: AdapterState
    aggregated_rounds: int
    privacy: dict[str, SitePrivacy]
    accounted: set[tuple[str, int]]
    noise: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """Plain types and tensors only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "round": self.round,
            "state": {k: v.detach().clone() for k, v in self.state.items()},
            "aggregated_rounds": self.aggregated_rounds,
            "privacy": {name: p.to_dict() for name, p in self.privacy.items()},
            "accounted": sorted([list(x) for x in self.accounted]),
            "noise": self.noise,
        }

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> ResumeState:
        """The inverse of ``to_dict``."""
        return cls(
            round=int(saved["round"]),
            state=dict(saved["state"]),
            aggregated_rounds=int(saved["aggregated_rounds"]),
            privacy={n: SitePrivacy.from_dict(d) for n, d in saved["privacy"].items()},
            accounted={(str(s), int(r)) for s, r in saved["accounted"]},
            noise=saved["noise"],
        )


class RunOutputs:
    """Writes and reads one run's checkpoints, ``metrics.jsonl``, ``privacy.json`` and final
    adapter under ``out``; ``model`` and ``metadata`` are what an adapter is exported with."""

    def __init__(self, out: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
        self.out = out
        self.model = model
        self.metadata = metadata
        self.saved_round: int | None = None  # the round whose metrics line is on disk

    @property
    def metrics(self) -> Path:
        """The run's ``metrics.jsonl``."""
        return self.out / "metrics.jsonl"

    def checkpoint_dir(self, round_num: int) -> Path:
        """Where round ``round_num``'s checkpoint is written."""
        return self.out / "checkpoints" / f"round-{round_num}"

    def needs_checkpoint(self, rec: RoundRecord) -> bool:
        """A round gets its checkpoint once, when it was aggregated (a round not aggregated
        trained nothing new; a line being completed already has its checkpoint)."""
        return rec.aggregated is True and self.saved_round != rec.round

    def write_checkpoint(
        self,
        round_num: int,
        state: AdapterState,
        optimizer_state: dict[str, Any],
        resume: ResumeState,
    ) -> None:
        """The round's adapter, the server optimizer's state and the resume state."""
        checkpoint = self.checkpoint_dir(round_num)
        export_adapter(self.model, state, checkpoint, self.metadata | {"round": round_num})
        # a resumed run continues the server optimizer exactly; the metrics line written
        # last is what marks the round (and its checkpoint) complete
        write_torch(checkpoint / OPTIMIZER_STATE, optimizer_state)
        write_torch(checkpoint / RESUME_STATE, resume.to_dict())

    def write_line(self, rec: RoundRecord) -> None:
        """The round's line of ``metrics.jsonl``: replacing the line an earlier write put there
        for the same round (its evaluation was pending), else added."""
        if self.saved_round == rec.round:
            lines = complete_lines(self.metrics)
            if lines and lines[-1].get("round") == rec.round:
                lines[-1] = rec.to_dict()
                write_text(self.metrics, "".join(jsonl_line(r) for r in lines))
                return
        append_jsonl(self.metrics, rec.to_dict())
        self.saved_round = rec.round

    def write_privacy(self, summary: dict[str, Any]) -> None:
        """``privacy.json``."""
        write_json(self.out / "privacy.json", summary)

    def export_final(self, state: AdapterState) -> None:
        """The run's final ``adapter/``."""
        export_adapter(self.model, state, self.out / "adapter", self.metadata)

    def aggregated_lines(self) -> list[dict[str, Any]]:
        """The complete lines of ``metrics.jsonl`` of rounds recorded as aggregated (a round
        recorded as not aggregated is where a failed run stopped: it runs again)."""
        return [r for r in complete_lines(self.metrics) if r.get("aggregated")]

    def read_checkpoint(self, round_num: int) -> tuple[ResumeState, dict[str, Any]]:
        """Round ``round_num``'s resume state and server optimizer state; a clear error when
        its checkpoint is missing or holds another round."""
        checkpoint = self.checkpoint_dir(round_num)
        try:
            saved = torch.load(checkpoint / RESUME_STATE, weights_only=True)
            optimizer = torch.load(checkpoint / OPTIMIZER_STATE, weights_only=True)
        except FileNotFoundError as exc:
            raise FederationError(
                f"{checkpoint}: round {round_num} is complete in metrics.jsonl but its "
                f"checkpoint is missing ({exc.filename}); the run cannot be resumed"
            ) from None
        if int(saved["round"]) != round_num:
            raise FederationError(
                f"{checkpoint}: holds round {saved['round']}, expected {round_num}"
            )
        return ResumeState.from_dict(saved), optimizer


def complete_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl``; a line torn by a crash while it was being
    appended is cut off (its round is not complete and will run again)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        write_text(path, text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
