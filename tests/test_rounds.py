"""The one round sequence (``fedslm/rounds.py``) and the typed round record.

The coordinator here is the real ``Coordinator`` on a tiny PEFT model (so checkpoints and
``metrics.jsonl`` are really written); only the transport, how replies are obtained, is a
test double: it records the order of the calls the sequence makes and what the coordinator
had on disk and in hand at each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator
from fedslm.errors import FederationError
from fedslm.messages import SiteEval, SiteReport
from fedslm.models.adapter import get_adapter_state
from fedslm.progress import Reporter
from fedslm.rounds import RoundRecord, run_round_sequence

SITES = ("site-1", "site-2")


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _coordinator(tmp_path: Path, rounds: int = 3) -> Coordinator:
    job = JobConfig.model_validate({"federation": {"sites": 2, "min_sites": 2, "rounds": rounds}})
    model = get_peft_model(_Tiny(), LoraConfig(r=1, target_modules=["lin"]))
    metadata = {"base_model": {"name": "tiny"}}
    return Coordinator(job, tmp_path, model, get_adapter_state(model), metadata)


def _lines(c: Coordinator) -> list[tuple[int, bool | None]]:
    """(round, evaluated) of each line of ``metrics.jsonl`` so far."""
    path = c.out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [(x["round"], x.get("evaluated")) for x in lines]


@dataclass
class RecordingTransport:
    """A transport whose sites answer at once: each reply moves lora_B by 0.1 (the default
    rule freezes A). ``broken`` rounds: one site fails (and the other's update alone is too
    few for ``min_sites``) on their first ``broken[r]`` attempts."""

    coordinator: Coordinator
    defers_evaluation: bool
    broken: dict[int, int] = field(default_factory=dict)
    calls: list[tuple] = field(default_factory=list)

    def _seen(self) -> tuple:
        rec = self.coordinator.record
        return (rec.round if rec is not None else None, tuple(_lines(self.coordinator)))

    def train(self, round_num: int, evaluate_round: int | None) -> float | None:
        self.calls.append(("train", round_num, evaluate_round, self._seen()))
        if evaluate_round is not None:
            self._fold_evaluations()
        return None

    def aggregate(self, round_num: int) -> bool:
        self.calls.append(("aggregate", round_num, self._seen()))
        c = self.coordinator
        state = {k: v if ".lora_A." in k else v + 0.1 for k, v in c.state.items()}
        reports = [SiteReport(s, state, 10, 1.0, 1, 0.1, 8, *[None] * 5) for s in SITES]
        failures: list[str] = []
        if self.broken.get(round_num, 0) > 0:
            self.broken[round_num] -= 1
            reports, failures = reports[:1], ["node 2: site-2: connection reset"]
        return c.aggregate(round_num, reports, failures) is not None

    def evaluate(self, round_num: int) -> None:
        self.calls.append(("evaluate", round_num, self._seen()))
        self._fold_evaluations()

    def _fold_evaluations(self) -> None:
        self.coordinator.record_evaluation([SiteEval(s, 0.5, 0.75, 4) for s in SITES], [])


def test_rounds_evaluated_at_once_run_in_order(tmp_path: Path) -> None:
    """In-process and centralized: train, start, aggregate, evaluate, end, round after round;
    each round's line is written after its evaluation, once."""
    c = _coordinator(tmp_path)
    t = RecordingTransport(c, defers_evaluation=False)
    run_round_sequence(c, t, Reporter(quiet=True))
    assert t.calls == [
        ("train", 1, None, (None, ())),
        ("aggregate", 1, (1, ())),
        ("evaluate", 1, (1, ())),
        ("train", 2, None, (1, ((1, True),))),
        ("aggregate", 2, (2, ((1, True),))),
        ("evaluate", 2, (2, ((1, True),))),
        ("train", 3, None, (2, ((1, True), (2, True)))),
        ("aggregate", 3, (3, ((1, True), (2, True)))),
        ("evaluate", 3, (3, ((1, True), (2, True)))),
    ]
    assert _lines(c) == [(1, True), (2, True), (3, True)]
    assert c.aggregated_rounds == 3


def test_deferred_evaluation_rides_on_the_next_round(tmp_path: Path) -> None:
    """Flower: round r's training carries round r-1's evaluation, folded into round r-1's
    record before round r starts; round r-1 is on disk (not yet evaluated) from its
    aggregation on; the last round is evaluated on its own."""
    c = _coordinator(tmp_path)
    t = RecordingTransport(c, defers_evaluation=True)
    run_round_sequence(c, t, Reporter(quiet=True))
    assert t.calls == [
        ("train", 1, None, (None, ())),
        ("aggregate", 1, (1, ())),
        ("train", 2, 1, (1, ((1, False),))),
        ("aggregate", 2, (2, ((1, True),))),
        ("train", 3, 2, (2, ((1, True), (2, False)))),
        ("aggregate", 3, (3, ((1, True), (2, True)))),
        ("evaluate", 3, (3, ((1, True), (2, True), (3, False)))),
    ]
    assert _lines(c) == [(1, True), (2, True), (3, True)]
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert (line["eval_accuracy"], line["sites"]["site-1"]["eval_loss"]) == (0.75, 0.5)


def test_a_failed_round_is_sent_again_then_stops_with_its_reason(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    t = RecordingTransport(c, defers_evaluation=True, broken={2: 1})
    run_round_sequence(c, t, Reporter(quiet=True), retries=1, stop_when_not_aggregated=True)
    trains = [(x[1], x[2]) for x in t.calls if x[0] == "train"]
    # round 1's evaluation came with round 2's first attempt; the retry carries none
    assert trains == [(1, None), (2, 1), (2, None), (3, 2)]
    assert c.aggregated_rounds == 3

    c = _coordinator(tmp_path / "again")
    t = RecordingTransport(c, defers_evaluation=True, broken={2: 5})
    with pytest.raises(FederationError, match="round 2 could not be aggregated after 2 attempt"):
        run_round_sequence(c, t, Reporter(quiet=True), retries=1, stop_when_not_aggregated=True)
    last = json.loads((c.out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["round"], last["aggregated"], last["attempts"]) == (2, False, 2)
    assert "min_sites is 2" in last["reason"] and "connection reset" in last["failures"][0]


def test_a_round_nothing_failed_in_is_not_retried(tmp_path: Path) -> None:
    """Every site refused: sending the round again cannot mend it."""
    c = _coordinator(tmp_path)

    class Refused(RecordingTransport):
        def aggregate(self, round_num: int) -> bool:
            self.calls.append(("aggregate", round_num))
            refusals = {s: ["over budget"] for s in SITES}
            return self.coordinator.aggregate(round_num, [], [], refusals) is not None

    t = Refused(c, defers_evaluation=True)
    with pytest.raises(FederationError, match="after 1 attempt"):
        run_round_sequence(c, t, Reporter(quiet=True), retries=3, stop_when_not_aggregated=True)
    assert [x[0] for x in t.calls] == ["train", "aggregate"]


def test_without_stopping_a_failed_round_is_recorded_and_the_next_one_runs(
    tmp_path: Path,
) -> None:
    """In-process: a round that was not aggregated is evaluated, recorded and left behind."""
    c = _coordinator(tmp_path)
    t = RecordingTransport(c, defers_evaluation=False, broken={1: 1})
    run_round_sequence(c, t, Reporter(quiet=True))
    assert [x[:2] for x in t.calls if x[0] != "train"] == [
        ("aggregate", 1),
        ("evaluate", 1),
        ("aggregate", 2),
        ("evaluate", 2),
        ("aggregate", 3),
        ("evaluate", 3),
    ]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["aggregated"] for x in lines] == [False, True, True]
    assert "attempts" not in lines[0] and c.aggregated_rounds == 2
    with pytest.raises(ValueError, match="retries need stop_when_not_aggregated"):
        run_round_sequence(c, t, Reporter(quiet=True), retries=1)


def test_a_record_writes_the_keys_of_its_stage_and_reads_back_the_same() -> None:
    """A round's line keeps only what happened to it; read back (a resumed run) it is the
    same line, the aggregation rule's own keys included."""
    fresh = RoundRecord(4)
    assert fresh.to_dict() == {"round": 4, "sites": {}, "failures": []}
    line = {
        "round": 2,
        "sites": {"a": {"train_loss": 1.0}},
        "failures": ["x"],
        "refusals": {"b": ["no"]},
        "train_loss": None,
        "bytes_sent": {"a": 8},
        "aggregated": True,
        "exact_energy_lost": 0.25,
        "eval_loss": None,
        "eval_accuracy": 0.5,
        "wall_seconds": 1.5,
        "evaluated": False,
        "finished_at": 12.0,
        "epsilon": {"a": None},
        "central_epsilon": 3.0,
    }
    back = RoundRecord.from_dict(json.loads(json.dumps(line)))
    assert back.to_dict() == line and back.rule == {"exact_energy_lost": 0.25}
    assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(line, sort_keys=True)
