"""A coordinator stopped after a completed round and resumed ends exactly where an
uninterrupted run ends: global adapter, server optimizer state, central DP noise, per-site
privacy record and round counter are restored from the checkpoint, and a round asked again
does not count a site's spend twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedslm.config import validate_config
from fedslm.coordinator import Coordinator
from fedslm.errors import FederationError
from fedslm.inprocess import build_site, to_report
from fedslm.job import PreparedJob, make_coordinator, prepare_job
from fedslm.messages import SiteReport
from fedslm.site import Site

pytestmark = pytest.mark.integration


def _job(tmp: Path, tiny_bert: Path, name: str) -> PreparedJob:
    raw = {
        "seed": 5,
        "model": {"path": str(tiny_bert)},
        "lora": {"r": 4, "alpha": 8},
        "train": {"local_steps": 2, "batch_size": 16, "max_length": 16, "learning_rate": 0.05},
        "privacy": {
            "noise_multiplier": 1.0,
            "central": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.5},
        },
        "federation": {
            "sites": 2,
            "rounds": 3,
            "server_optimizer": {"name": "adam", "learning_rate": 0.05},
        },
        "data": {"synthetic": {"rows_per_site": 120}},
    }
    return prepare_job(validate_config(raw), "test", tmp / name)


def _rounds(c: Coordinator, sites: list[Site], first: int, last: int) -> None:
    for r in range(first, last + 1):
        c.start_round(r)
        reports = [to_report(s, s.train_round(r, c.state)) for s in sites]
        assert c.aggregate(r, reports, []) is not None
        c.end_round()


def _killed_in_round_3(
    tmp_path: Path, tiny_bert: Path
) -> tuple[PreparedJob, list[Site], Coordinator, list[SiteReport], dict[str, torch.Tensor]]:
    """A run whose coordinator recorded rounds 1 and 2, then aggregated round 3 and died before
    recording it: the job, its sites, that coordinator, round 3's reports and the state it
    reached (what a resumed run must reach too)."""
    job = _job(tmp_path, tiny_bert, "run")
    sites = [build_site(job, s, with_policy=False) for s in job.sites]
    original = make_coordinator(job)
    _rounds(original, sites, 1, 2)
    original.start_round(3)
    reports = [to_report(s, s.train_round(3, original.state)) for s in sites]
    original.aggregate(3, reports, [])
    return job, sites, original, reports, {k: v.clone() for k, v in original.state.items()}


def test_resume_continues_exactly(tmp_path: Path, tiny_bert: Path) -> None:
    job, sites, original, reports, uninterrupted = _killed_in_round_3(tmp_path, tiny_bert)

    resumed = make_coordinator(job)  # a new process: fresh central noise generator
    assert resumed.resume() == 2
    assert resumed.aggregated_rounds == 2
    # a retried round: the first attempt has one site short of min_sites (not aggregated),
    # the second both; the site that replied twice (the same release) is accounted once
    resumed.start_round(3)
    assert resumed.aggregate(3, reports[:1], ["node 2: timed out"]) is None
    resumed.start_round(3)
    assert resumed.aggregate(3, reports, []) is not None
    resumed.end_round()

    # server optimizer moments and central noise continued: equal to the last bit
    assert all(torch.equal(resumed.state[k], uninterrupted[k]) for k in uninterrupted)
    assert resumed.privacy_summary()["sites"] == original.privacy_summary()["sites"]
    for s in sites:
        assert resumed.privacy_summary()["sites"][s.name]["dp_steps"] == 3 * s.plan.steps_per_round
    lines = [json.loads(x) for x in (job.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]


def test_resume_cuts_a_torn_metrics_line_and_names_a_missing_checkpoint(
    tmp_path: Path, tiny_bert: Path
) -> None:
    job = _job(tmp_path, tiny_bert, "torn")
    sites = [build_site(job, s, with_policy=False) for s in job.sites]
    c = make_coordinator(job)
    _rounds(c, sites, 1, 1)
    metrics = job.out / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write('{"round": 2, "aggreg')  # killed while appending round 2
    assert make_coordinator(job).resume() == 1
    assert metrics.read_text().endswith("}\n")
    (job.out / "checkpoints" / "round-1" / "coordinator_state.pt").unlink()
    with pytest.raises(FederationError, match=r"round-1.*checkpoint is missing"):
        make_coordinator(job).resume()


def test_a_run_folder_written_before_the_server_optimizer_rename_resumes(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """A run folder of an earlier fedslm spells the server optimizer 'fedadam' in job.json
    (with proximal_mu under server_optimizer) and in every server_optimizer.pt: it loads as
    the same job (same fingerprint, so the same job id and noise seeds) and resumes exactly."""
    job, _, _, reports, uninterrupted = _killed_in_round_3(tmp_path, tiny_bert)

    # what the earlier version wrote
    manifest = json.loads(job.save().read_text())
    opt = manifest["config"]["federation"]["server_optimizer"]
    assert opt["name"] == "adam" and "proximal_mu" not in opt
    opt |= {"name": "fedadam", "proximal_mu": None}
    del manifest["config"]["train"]["proximal_mu"]
    (job.out / "job.json").write_text(json.dumps(manifest))
    checkpoints = sorted(job.out.glob("checkpoints/round-*/server_optimizer.pt"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        state = torch.load(path, weights_only=True)
        assert state["kind"] == "adam"
        torch.save({**state, "kind": "fedadam"}, path)

    with pytest.warns(FutureWarning, match="server_optimizer.name 'fedadam'"):
        old = PreparedJob.load(job.out / "job.json")
    assert old.job == job.job and old.job.fingerprint() == job.job.fingerprint()
    resumed = make_coordinator(old)
    assert resumed.resume() == 2
    resumed.start_round(3)
    assert resumed.aggregate(3, reports, []) is not None
    resumed.end_round()
    assert all(torch.equal(resumed.state[k], uninterrupted[k]) for k in uninterrupted)
