"""The coordinator without Flower: min-sites guard, rejected updates, privacy summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator, SiteReport
from fedslm.privacy.accounting import Segment


class _Exportable(torch.nn.Module):
    """Stand-in for the PEFT model, only for tests that never export."""


def report(
    site: str, value: float, n: int = 10, seg: Segment | None = None, eps: float | None = None
) -> SiteReport:
    return SiteReport(
        site,
        {"w": torch.full((2,), value)},
        n,
        1.0,
        3,
        0.1,
        8,
        seg,
        eps,
        1e-5 if seg else None,
        "prv" if seg else None,
        1.0 if seg else None,
    )


def coordinator(tmp_path: Path, min_sites: int) -> Coordinator:
    job = JobConfig.model_validate({"federation": {"sites": 3, "min_sites": min_sites}})
    return Coordinator(job, tmp_path, _Exportable(), {"w": torch.zeros(2)}, {})


def test_round_with_too_few_sites_is_not_aggregated(tmp_path: Path) -> None:
    c = coordinator(tmp_path, min_sites=2)
    c.start_round(1)
    assert c.aggregate(1, [report("site-1", 1.0)], ["node 7: timeout"]) is None
    assert c.record.aggregated is False
    assert "min_sites is 2" in c.record.reason
    torch.testing.assert_close(c.state["w"], torch.zeros(2))  # global adapter unchanged


def test_weighted_by_examples_and_bad_updates_rejected(tmp_path: Path) -> None:
    c = coordinator(tmp_path, min_sites=2)
    c.start_round(1)
    bad = SiteReport(
        "site-3",
        {"w": torch.tensor([float("nan"), 0.0])},
        10,
        1.0,
        3,
        0.1,
        8,
        None,
        None,
        None,
        None,
        None,
    )
    out = c.aggregate(1, [report("site-1", 1.0, n=10), report("site-2", 4.0, n=30), bad], [])
    assert out is not None
    torch.testing.assert_close(out["w"], torch.full((2,), 3.25))
    assert any("site-3" in f and "non-finite" in f for f in c.record.failures)


def test_privacy_summary_recomputes_and_flags_mismatch(tmp_path: Path) -> None:
    c = coordinator(tmp_path, min_sites=1)
    seg = Segment(0.05, 1.1, 40)
    from fedslm.privacy.accounting import epsilon

    honest = epsilon([seg], 1e-5, "prv")
    c.start_round(1)
    c.aggregate(
        1,
        [
            report("site-1", 1.0, seg=seg, eps=honest),
            report("site-2", 1.0, seg=seg, eps=honest / 2),
        ],
        [],
    )
    summary = c.privacy_summary()
    s1, s2 = summary["sites"]["site-1"], summary["sites"]["site-2"]
    assert s1["epsilon_check"] == "ok"
    assert s2["epsilon_check"] == "MISMATCH"  # a site under-reporting its spend is caught
    assert s1["epsilon_rdp"] >= s1["epsilon_recomputed_pld"]
    assert s1["dp_steps"] == 40 and s1["noise_multiplier"] == 1.1
    assert json.dumps(summary)  # serialisable
    assert not math.isnan(s1["epsilon_recomputed_pld"])


def test_fewer_min_sites_than_sites_validated() -> None:
    with pytest.raises(ValueError):
        JobConfig.model_validate({"federation": {"sites": 2, "min_sites": 5}})
