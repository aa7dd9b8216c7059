"""The one round sequence (``fedslm/rounds.py``) and the typed round record.

The coordinator here is the real ``Coordinator`` on a tiny PEFT model (so checkpoints and
``metrics.jsonl`` are really written); only the transport, how replies are obtained, is a
test double: it records the order of the calls the sequence makes and what the coordinator
had on disk and in hand at each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedslm.artifacts import jsonl_line
from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator
from fedslm.errors import FederationError
from fedslm.messages import SiteEval, SiteReport
from fedslm.models.adapter import get_adapter_state
from fedslm.privacy.accounting import Segment
from fedslm.progress import Reporter
from fedslm.rounds import RoundRecord, SiteRound, run_round_sequence
from fedslm.secagg.messages import SecAggResult

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
        "sites": {"a": {"eval_withheld": "2 evaluation records, policy needs 50"}},
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


# the first line of a real run's metrics.jsonl (`fedslm simulate configs/smoke.yaml`), verbatim
REAL_LINE = (
    '{"aggregated": true, "bytes_sent": {"site-1": 13286, "site-2": 13286, "site-3": 13286}, '
    '"epsilon": {"site-1": 5.825232597255072, "site-2": 5.825232597255072, '
    '"site-3": 5.825232597255072}, "eval_accuracy": 0.19666666666666666, '
    '"eval_loss": 2.211850732167562, "evaluated": true, "failures": [], '
    '"finished_at": 1796628481.537, "refusals": {}, "round": 1, '
    '"sites": {"site-1": {"bytes_sent": 13286, "epsilon": 5.825232597255072, '
    '"eval_accuracy": 0.215, "eval_examples": 200, "eval_loss": 2.23103928565979, '
    '"ledger_head": "1d439da9a78bf8a11d2e562cc5c9038653d2f0cb8b5158b19c8f5b2629830462", '
    '"ledger_seq": 1, "num_examples": 800, "privacy_seconds": 0.11021441900084028, '
    '"seconds": 5.008818170004815, "steps": 75, "train_loss": 2.154226836186518, '
    '"update_norm": 17.006855162181886}, "site-2": {"bytes_sent": 13286, '
    '"epsilon": 5.825232597255072, "eval_accuracy": 0.185, "eval_examples": 200, '
    '"eval_loss": 2.1182884120941163, '
    '"ledger_head": "382b7c64f627ee834e5c7c406be230d9396c0fac7c9c0f72310f1bb109190cdb", '
    '"ledger_seq": 1, "num_examples": 800, "privacy_seconds": 0.11617720600042958, '
    '"seconds": 3.826181948003068, "steps": 75, "train_loss": 2.0370910354194023, '
    '"update_norm": 17.318420595983437}, "site-3": {"bytes_sent": 13286, '
    '"epsilon": 5.825232597255072, "eval_accuracy": 0.19, "eval_examples": 200, '
    '"eval_loss": 2.2862244987487794, '
    '"ledger_head": "4b45829a028f2e2cfa8e7dc631eca2f09e7cdbd1b4e9ce0104612d829394a889", '
    '"ledger_seq": 1, "num_examples": 800, "privacy_seconds": 0.012616968000656925, '
    '"seconds": 3.9735247990029166, "steps": 75, "train_loss": 1.9888990351924856, '
    '"update_norm": 17.168807490290988}}, "train_loss": 2.060072302266135, '
    '"wall_seconds": 16.87598170700221}'
)

TRAINING = {
    "train_loss",
    "steps",
    "num_examples",
    "seconds",
    "privacy_seconds",
    "bytes_sent",
    "epsilon",
    "ledger_seq",
    "ledger_head",
}
EVALUATION = {"eval_loss", "eval_accuracy", "eval_examples"}


def test_a_real_line_reads_back_typed_and_writes_the_same_bytes() -> None:
    """A resumed run reads its last line into typed site records and writes it back unchanged."""
    rec = RoundRecord.from_dict(json.loads(REAL_LINE))
    one = rec.sites["site-1"]
    assert isinstance(one, SiteRound) and one.trained and one.evaluation_in
    assert (one.steps, one.num_examples, one.ledger_seq, one.eval_examples) == (75, 800, 1, 200)
    assert one.update_norm == 17.006855162181886 and one.in_secure_sum is None
    assert jsonl_line(rec.to_dict()) == REAL_LINE + "\n"


def _every_key() -> RoundRecord:
    """A round with every optional key of the line and every kind of site entry."""
    dp = {"epsilon": 1.5, "ledger_seq": 4, "ledger_head": "ab" * 32}
    trained = {
        "train_loss": 2.5,
        "steps": 3,
        "num_examples": 40,
        "seconds": 1.25,
        "privacy_seconds": 0.5,
        "bytes_sent": 4096,
    }
    no_dp = {"epsilon": None, "ledger_seq": None, "ledger_head": None}
    return RoundRecord(
        round=3,
        sites={
            # plain aggregation under DP, evaluated
            "a": SiteRound(
                True,
                **trained,
                **dp,
                update_norm=0.75,
                evaluation_in=True,
                eval_loss=2.0,
                eval_accuracy=0.5,
                eval_examples=10,
            ),
            # secure aggregation without DP, its input left out of the sum, evaluation withheld
            "b": SiteRound(True, **trained, **no_dp, in_secure_sum=False, eval_withheld="few"),
            # refused the round's training, evaluated all the same (loss not finite: null)
            "c": SiteRound(evaluation_in=True, eval_loss=None, eval_accuracy=0.25, eval_examples=8),
        },
        failures=["update rejected: d: frozen tensors changed", "evaluate: node 5: timeout"],
        refusals={"c": ["max_epsilon_per_job reached"]},
        train_loss=2.5,
        bytes_sent={"a": 4096, "b": 4096},
        aggregated=False,
        reason="only 1 of 4 sites returned a usable update",
        secure_aggregation={
            "survivors": ["a"],
            "dropouts": [],
            "total_weight": 40.0,
            "sum_error_bound": 1e-6,
            "seconds": {"protocol": 0.5},
        },
        central_dp={"sites": 2, "clipped": 1, "noise_std_of_mean": 0.01},
        rule={"exact_energy_lost": 0.25},
        eval_loss=2.0,
        eval_accuracy=0.4,
        evaluation_in=True,
        wall_seconds=9.5,
        evaluated=True,
        finished_at=1796628481.537,
        epsilon={"a": 1.5, "b": None},
        central_epsilon=3.0,
        attempts=2,
    )


def test_every_kind_of_site_entry_round_trips_with_exactly_its_keys() -> None:
    """from_dict(to_dict(x)) == x, through a JSON line too, and each site entry has the keys
    the coordinator writes for it: a None within a group is null, a group that did not happen
    is absent."""
    rec = _every_key()
    assert RoundRecord.from_dict(rec.to_dict()) == rec
    assert RoundRecord.from_dict(json.loads(jsonl_line(rec.to_dict()))) == rec
    sites = rec.to_dict()["sites"]
    assert set(sites["a"]) == TRAINING | EVALUATION | {"update_norm"}
    assert set(sites["b"]) == TRAINING | {"in_secure_sum", "eval_withheld"}
    assert sites["b"]["epsilon"] is None and sites["b"]["in_secure_sum"] is False
    assert sites["c"] == {"eval_loss": None, "eval_accuracy": 0.25, "eval_examples": 8}


def test_a_site_entry_with_a_key_this_release_does_not_write_is_refused_by_name() -> None:
    line = json.loads(REAL_LINE)
    line["sites"]["site-2"]["gradient_norm"] = 1.0
    with pytest.raises(ValueError, match=r"round 1: sites.site-2: 'gradient_norm' is not a key"):
        RoundRecord.from_dict(line)
    # an earlier release's entry (before ledger_seq) reads as None and writes it as null
    old = {k: v for k, v in json.loads(REAL_LINE)["sites"]["site-1"].items() if k != "ledger_seq"}
    assert SiteRound.from_dict(old).to_dict() == old | {"ledger_seq": None}


def test_the_coordinator_records_each_site_as_a_typed_entry(tmp_path: Path) -> None:
    """What the coordinator keeps of each training reply (plain and secure aggregation) and
    evaluation: the typed entry's fields, and the line's keys as metrics.jsonl has them."""
    c = _coordinator(tmp_path)
    c.start_round(1)
    state = {k: v if ".lora_A." in k else v + 0.1 for k, v in c.state.items()}
    dp = SiteReport(
        "site-1",
        state,
        10,
        1.0,
        2,
        0.5,
        64,
        Segment(0.1, 1.0, 2),
        0.8,
        1e-5,
        "rdp",
        1.0,
        0.9,
        "cd" * 32,
        0.25,
        7,
    )
    plain = SiteReport("site-2", state, 30, math.nan, 4, 0.5, 64, *[None] * 5)
    assert c.aggregate(1, [dp, plain], []) is not None
    c.record_evaluation(
        [SiteEval("site-1", 0.5, 0.75, 4), SiteEval.withheld_by("site-2", "few")], []
    )
    one, two = c.record.sites["site-1"], c.record.sites["site-2"]
    assert (one.trained, one.epsilon, one.ledger_seq, one.eval_examples) == (True, 0.8, 7, 4)
    assert one.update_norm is not None and one.update_norm > 0 and one.in_secure_sum is None
    assert math.isnan(two.train_loss) and two.epsilon is None and two.eval_withheld == "few"
    line = json.loads(jsonl_line(c.record.to_dict()))["sites"]
    assert set(line["site-1"]) == TRAINING | EVALUATION | {"update_norm"}
    assert set(line["site-2"]) == TRAINING | {"update_norm", "eval_withheld"}
    assert line["site-2"]["train_loss"] is None and line["site-2"]["ledger_head"] is None
    c.start_round(2)
    result = SecAggResult(torch.zeros(0).numpy(), 40, [1, 2], [], 0.0)
    c.aggregate_secure(2, [dp], [], {"site-2": ["no"]}, result, ["site-1"])
    secure = c.record.sites["site-1"]
    assert secure.in_secure_sum is True and secure.update_norm is None
    assert set(secure.to_dict()) == TRAINING | {"in_secure_sum"}
    assert "site-2" not in c.record.sites  # a refusal is kept in refusals, not per site


def test_resuming_from_a_line_this_release_did_not_write_names_the_file(tmp_path: Path) -> None:
    c = _coordinator(tmp_path, rounds=2)
    t = RecordingTransport(c, defers_evaluation=True)
    c.start_round(1)
    assert t.aggregate(1)
    c.save_round()  # on disk, evaluation pending: a resume reads the line back
    path = tmp_path / "metrics.jsonl"
    line = json.loads(path.read_text())
    line["sites"]["site-1"]["gradient_norm"] = 1.0
    path.write_text(jsonl_line(line))
    with pytest.raises(FederationError, match=r"metrics.jsonl: cannot resume .*'gradient_norm'"):
        _coordinator(tmp_path, rounds=2).resume()


def test_the_progress_lines_read_the_typed_site_entries(capsys: pytest.CaptureFixture[str]) -> None:
    """One line per site: a site that only evaluated shows no steps and nothing sent."""
    Reporter().round_done(_every_key(), 5)
    err = capsys.readouterr().err
    assert "  a: steps 3 train loss 2.5000 eval loss 2.0000 acc 0.500 eps 1.500 sent 4,096 B" in err
    assert "  b: steps 3 train loss 2.5000 eval loss - acc - eps - sent 4,096 B" in err
    assert "  c: steps - train loss - eval loss - acc 0.250 eps - sent 0 B" in err
    assert "round 3 not aggregated: only 1 of 4 sites" in err
