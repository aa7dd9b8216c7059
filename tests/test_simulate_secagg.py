"""End to end: ``fedslm simulate`` with secure aggregation on Flower's simulation engine.

The same seeded job runs twice, with and without secure aggregation: the sites train the same
updates, so the two global adapters after round 1 must agree within the quantisation bound, and
the secure run's egress logs must show the protocol messages and not one adapter tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedslm.config import load_config
from fedslm.privacy.egress_log import egress_entries
from fedslm.privacy.ledger import PrivacyLedger
from fedslm.secagg.adapter import job_params

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
COMMON = ["--set", "federation.rounds=1", "--set", "data.synthetic.rows_per_site=200"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fedslm.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("secagg-sim")
    plain, secure = base / "plain", base / "secure"
    run_cli("simulate", str(SMOKE), "--out", str(plain), "-q", *COMMON)
    run_cli(
        "simulate", str(SMOKE), "--out", str(secure), "-q", *COMMON,
        "--set", "federation.secure_aggregation=true",
    )  # fmt: skip
    return plain, secure


def test_secure_adapter_equals_plain_within_the_quantisation_bound(
    runs: tuple[Path, Path],
) -> None:
    plain, secure = runs
    a = load_file(str(plain / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(secure / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and a
    (line,) = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()]
    assert line["aggregated"] and line["failures"] == []
    sa = line["secure_aggregation"]
    assert sa["survivors"] == ["site-1", "site-2", "site-3"]
    job = load_config(SMOKE, [*COMMON[1::2], "federation.secure_aggregation=true"])
    params = job_params(job, b"x", 3)
    # the mean is within step/2 of the mean of the (unclipped: |delta| < clip_range) updates,
    # plus float32 rounding of global + mean delta in both runs
    bound = sa["sum_error_bound"] / sa["total_weight"]
    assert bound <= params.step
    for k in a:
        atol = bound + 4 * torch.finfo(torch.float32).eps * float(a[k].abs().max())
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())
    # the plain run's metrics say the same sites trained the same way
    (pline,) = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    for site, rec in pline["sites"].items():
        assert line["sites"][site]["train_loss"] == pytest.approx(rec["train_loss"], rel=1e-9)


def test_secure_sites_sent_protocol_messages_and_no_adapter(runs: tuple[Path, Path]) -> None:
    _, secure = runs
    for site in ("site-1", "site-2", "site-3"):
        with PrivacyLedger(secure / "sites" / site / "ledger.db", create=False) as ledger:
            entries = egress_entries(ledger)
        kinds = [(e.kind, e.status) for e in entries]
        assert kinds == [
            ("train-secure", "sent"),
            ("secagg-shares", "sent"),
            ("secagg-masked", "sent"),
            ("secagg-unmask", "sent"),
            ("evaluate", "sent"),
        ], kinds
        assert all(e.record["tensors"] == [] for e in entries)  # no adapter tensor left
        (masked,) = [e for e in entries if e.kind == "secagg-masked"]
        (vector,) = masked.record["vectors"]
        assert vector["name"] == "masked" and vector["dtype"] in ("<u4", "<u8")
        train = entries[0].record
        assert train["fields"]["dp"] is True and "epsilon" in train["fields"]
        assert set(train["fields"]["cipher_pk"]) == {"bytes", "sha256"}


def test_reports_say_what_the_coordinator_saw(runs: tuple[Path, Path]) -> None:
    from fedslm.report.build import collect

    plain, secure = runs
    job = json.loads((secure / "job.json").read_text())
    assert job["config"]["federation"]["secure_aggregation"] is True
    r = collect(secure)
    assert [c.name for c in r.checks if not c.passed] == []
    assert any("only the records-weighted sum" in s for s in r.summary.who_saw_what)
    assert any("saw only the sum of the sites' masked updates" in t for t in r.trust_model)
    p = collect(plain)
    assert any("individually" in s for s in p.summary.who_saw_what)
    assert not any("masked updates" in t for t in p.trust_model)
