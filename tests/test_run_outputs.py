"""A run's outputs on disk without a coordinator: resume state round trip, a round's metrics
line replaced or added, a torn line cut off, a missing checkpoint named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedslm.errors import FederationError
from fedslm.privacy.accounting import Segment
from fedslm.privacy_summary import SitePrivacy
from fedslm.rounds import RoundRecord
from fedslm.run_outputs import RESUME_STATE, ResumeState, RunOutputs, complete_lines


def _resume_state(round_num: int = 2) -> ResumeState:
    gen = torch.Generator().manual_seed(7)
    privacy = {
        "bank": SitePrivacy(
            segments=[Segment(0.01, 1.1, 3), Segment(0.02, 0.9, 4)],
            reported_epsilon=1.5,
            delta=1e-5,
            accountant="prv",
            ledger_head="ab" * 32,
            ledger_seq=4,
            records=100,
            rounds=2,
            refusals=["round 1: over budget"],
        )
    }
    return ResumeState(
        round=round_num,
        state={"w": torch.tensor([0.1, -0.2], dtype=torch.float32)},
        aggregated_rounds=2,
        privacy=privacy,
        accounted={("bank", 1), ("bank", 2)},
        noise=gen.get_state(),
    )


def _record(round_num: int, evaluated: bool) -> RoundRecord:
    rec = RoundRecord(round_num)
    rec.aggregated, rec.evaluated = True, evaluated
    return rec


def test_resume_state_round_trips_through_torch_save(tmp_path: Path) -> None:
    original = _resume_state()
    torch.save(original.to_dict(), tmp_path / RESUME_STATE)
    back = ResumeState.from_dict(torch.load(tmp_path / RESUME_STATE, weights_only=True))
    assert back.round == 2 and back.aggregated_rounds == 2
    assert back.privacy == original.privacy  # segments come back as Segment, not lists
    assert back.accounted == original.accounted
    torch.testing.assert_close(back.state["w"], original.state["w"], rtol=0, atol=0)
    # the noise generator continues exactly where it stopped
    a, b = torch.Generator(), torch.Generator()
    a.set_state(original.noise)
    b.set_state(back.noise)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))


def test_resume_state_copies_the_adapter() -> None:
    state = _resume_state()
    saved = state.to_dict()
    state.state["w"].add_(1.0)  # the coordinator's next step must not change the saved state
    assert saved["state"]["w"].tolist() == pytest.approx([0.1, -0.2])


def test_a_pending_line_is_replaced_and_the_next_one_added(tmp_path: Path) -> None:
    out = RunOutputs(tmp_path, torch.nn.Module(), {})
    first = _record(1, evaluated=False)
    assert out.needs_checkpoint(first)
    out.write_line(first)  # save_round: evaluation pending
    assert not out.needs_checkpoint(first)  # the checkpoint is written once
    first.evaluated = True
    out.write_line(first)  # end_round completes the same line
    out.write_line(_record(2, evaluated=True))
    lines = [json.loads(x) for x in out.metrics.read_text().splitlines()]
    assert [(d["round"], d["evaluated"]) for d in lines] == [(1, True), (2, True)]
    assert [d["round"] for d in out.aggregated_lines()] == [1, 2]


def test_a_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"round": 1, "aggregated": true}\n{"round": 2, "aggr')
    assert complete_lines(metrics) == [{"round": 1, "aggregated": True}]
    assert metrics.read_text() == '{"round": 1, "aggregated": true}\n'
    assert complete_lines(tmp_path / "absent.jsonl") == []


def test_a_missing_or_foreign_checkpoint_is_named(tmp_path: Path) -> None:
    out = RunOutputs(tmp_path, torch.nn.Module(), {})
    with pytest.raises(FederationError, match=r"round-3: round 3 is complete .* missing"):
        out.read_checkpoint(3)
    folder = out.checkpoint_dir(3)
    folder.mkdir(parents=True)
    torch.save(_resume_state(round_num=2).to_dict(), folder / RESUME_STATE)
    torch.save({}, folder / "server_optimizer.pt")
    with pytest.raises(FederationError, match="holds round 2, expected 3"):
        out.read_checkpoint(3)
