"""End to end: ``fedslm simulate`` with secure aggregation on Flower's simulation engine.

The same seeded job runs twice, with and without secure aggregation: the sites train the same
updates, so the two global adapters after round 1 must agree within the quantisation bound, and
the secure run's egress logs must show the protocol messages and not one adapter tensor.

Then a site drops out after sharing its keys, for a reason a real site could have: its policy's
``max_bytes_per_round`` admits the float32 adapter (what the round check costs, 4 bytes per
parameter) but not the masked vector (8 bytes per coordinate in the default 64-bit ring), so its
egress guard blocks its masked input and it answers with a refusal. With 4 sites and threshold
3 the other three sites' sum is aggregated; with threshold 4 the round fails and nothing is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedslm.config import load_config
from fedslm.inprocess import build_site, to_report
from fedslm.job import PreparedJob, make_coordinator
from fedslm.privacy.egress_log import egress_entries
from fedslm.privacy.ledger import PrivacyLedger
from fedslm.secagg.adapter import job_params

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
COMMON = ["--set", "federation.rounds=1", "--set", "data.synthetic.rows_per_site=200"]


def run_cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = os.environ.copy()
    if "--out" in args:
        # each run its own privacy budget: these runs compare jobs on the same data, which
        # would otherwise compose in one ledger per data set and exhaust it
        env["FEDSLM_LEDGERS"] = f"{args[args.index('--out') + 1]}-ledgers"
    proc = subprocess.run(
        [sys.executable, "-m", "fedslm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def ledger_of(run: Path, site: str) -> Path:
    """The site's ledger, where job.json says (simulated ledgers live outside the run)."""
    sites = json.loads((run / "job.json").read_text())["sites"]
    return Path(next(s["ledger"] for s in sites if s["name"] == site))


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
        with PrivacyLedger(ledger_of(secure, site), create=False) as ledger:
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


# -- a site dropping out after sharing its keys ------------------------------------------------

# 4 sites, 2 local steps: the smallest run that has a dropout above and below the threshold
# (a fixed noise multiplier skips the noise calibration, seconds per process).
# site-4 allows 16,000 bytes per round: tiny-bert's adapter at r=4 is 2,698 float32 parameters
# (10,792 bytes, what check_round costs), its masked vector 2,699 x 8 = 21,592 bytes.
LIMIT = 16_000
DROPOUT = [
    *COMMON[:2],
    "--set", "data.synthetic.rows_per_site=100",
    "--set", "federation.sites=4",
    "--set", "train.local_epochs=null",
    "--set", "train.local_steps=2",
    "--set", "train.batch_size=16",
    "--set", "privacy.target_epsilon=null",
    "--set", "privacy.noise_multiplier=1.0",
    "--set", "federation.secure_aggregation=true",
    "--set", f"policy.sites.site-4.max_bytes_per_round={LIMIT}",
]  # fmt: skip
BLOCKED = f"21,592 bytes of vectors; the site policy allows {LIMIT:,} per round"
DROPPED = {
    "site": "site-4",
    "stage": "masked-input",
    "reason": f"refused: egress guard blocked the secagg-masked reply: {BLOCKED}",
}


@pytest.fixture(scope="module")
def dropout_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path
) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """The job with threshold 3 (aggregates) and 4 (fails: exit 2, no round aggregated)."""
    base = tmp_path_factory.mktemp("secagg-dropout")
    t3, t4 = base / "t3", base / "t4"
    run_cli("simulate", str(SMOKE), "--out", str(t3), "-q", *DROPOUT,
            "--set", "federation.secagg.threshold=3")  # fmt: skip
    failed = run_cli("simulate", str(SMOKE), "--out", str(t4), "-q", *DROPOUT,
                     "--set", "federation.secagg.threshold=4", expect=2)  # fmt: skip
    return t3, t4, failed


def _plain_mean_of_three(run: Path, tmp: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The initial adapter and the plain (unmasked) FedAvg round of site-1..3, trained here
    with the run's own data, seed and settings through the same ``Site`` and ``Coordinator``
    code, into ledgers of their own (the run's files are not touched)."""
    prepared = PreparedJob.load(run / "job.json")
    coordinator = make_coordinator(prepared)
    initial = dict(coordinator.state)
    reports = []
    for setup in prepared.sites[:3]:
        site = build_site(prepared, replace(setup, ledger=tmp / f"{setup.name}.db"))
        reports.append(to_report(site, site.train_round(1, initial)))
    coordinator.start_round(1)
    plain = coordinator.aggregate(1, reports, [])
    assert plain is not None, coordinator.record
    return initial, plain


def _site4_egress(run: Path) -> list:
    with PrivacyLedger(ledger_of(run, "site-4"), create=False) as ledger:
        return egress_entries(ledger)


def test_a_dropout_after_sharing_keys_leaves_the_sum_of_the_others(
    dropout_runs: tuple[Path, Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    t3, _, _ = dropout_runs
    (line,) = [json.loads(x) for x in (t3 / "metrics.jsonl").read_text().splitlines()]
    assert line["aggregated"] is True, line
    sa = line["secure_aggregation"]
    assert sa["survivors"] == ["site-1", "site-2", "site-3"]
    assert sa["dropouts"] == [DROPPED]
    # listed once, with the site's own reason
    assert line["failures"] == [
        f"site-4 dropped out of secure aggregation at stage 'masked-input': {DROPPED['reason']}"
    ]
    assert line["refusals"] == {}
    assert line["sites"]["site-4"]["in_secure_sum"] is False
    assert all(line["sites"][s]["in_secure_sum"] for s in ("site-1", "site-2", "site-3"))
    # the premise: the round check passed on the float32 size, the masked vector did not fit
    secure = load_file(str(t3 / "adapter" / "adapter_model.safetensors"))
    params = sum(t.numel() for t in secure.values())
    assert 4 * params <= LIMIT < 8 * (params + 1)
    # the weight in the sum is site-1..3's records only
    initial, plain = _plain_mean_of_three(t3, tmp_path)
    assert sa["total_weight"] == sum(line["sites"][s]["num_examples"] for s in sa["survivors"])
    bound = sa["sum_error_bound"] / sa["total_weight"]
    moved = max(float((plain[k] - initial[k]).abs().max()) for k in plain)
    assert moved > 100 * bound  # the round moved the adapter far more than the tolerance
    for k in plain:
        atol = bound + 4 * torch.finfo(torch.float32).eps * float(plain[k].abs().max())
        diff = float((secure[k] - plain[k]).abs().max())
        assert diff <= atol, (k, diff, atol)


def test_the_dropped_sites_egress_log_shows_its_masked_input_blocked(
    dropout_runs: tuple[Path, Path, subprocess.CompletedProcess[str]],
) -> None:
    t3, _, _ = dropout_runs
    entries = _site4_egress(t3)
    assert [(e.kind, e.status) for e in entries] == [
        ("train-secure", "sent"),
        ("secagg-shares", "sent"),
        ("secagg-masked", "blocked"),
        ("refusal", "sent"),
        ("evaluate", "sent"),
    ]
    masked = entries[2].record
    assert masked["blocked_because"] == [BLOCKED]
    assert masked["tensor_bytes"] == 21_592
    assert entries[3].record["fields"]["reasons"] == [
        f"egress guard blocked the secagg-masked reply: {BLOCKED}"
    ]


def test_the_report_lists_the_dropout_and_its_checks_pass(
    dropout_runs: tuple[Path, Path, subprocess.CompletedProcess[str]],
) -> None:
    from fedslm.report.build import collect

    t3, _, _ = dropout_runs
    r = collect(t3)
    assert [c.name for c in r.checks if not c.passed] == []
    assert [f.message for f in r.failures] == [
        f"site-4 dropped out of secure aggregation at stage 'masked-input': {DROPPED['reason']}"
    ]
    blocked = [(m.site, m.kind) for m in r.egress.per_message_log if m.status == "blocked"]
    assert blocked == [("site-4", "secagg-masked")]


def test_below_the_threshold_the_round_fails_and_nothing_is_aggregated(
    dropout_runs: tuple[Path, Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    _, t4, failed = dropout_runs
    (line,) = [json.loads(x) for x in (t4 / "metrics.jsonl").read_text().splitlines()]
    assert line["aggregated"] is False
    assert line["reason"] == (
        "secure aggregation failed: secure aggregation round 2: only 3 of 4 sites sent a "
        "masked input; the threshold is 4, so the sum cannot be recovered and nothing was "
        "aggregated"
    )
    assert line["secure_aggregation"]["survivors"] == []
    assert line["secure_aggregation"]["dropouts"] == [DROPPED]
    assert f"error: round 1 could not be aggregated after 1 attempt(s): {line['reason']}" in (
        failed.stderr
    )
    # no site was asked to unmask: the three masked inputs stay masked
    for site in ("site-1", "site-2", "site-3"):
        with PrivacyLedger(ledger_of(t4, site), create=False) as ledger:
            kinds = [e.kind for e in egress_entries(ledger)]
        assert "secagg-masked" in kinds and "secagg-unmask" not in kinds
    assert [(e.kind, e.status) for e in _site4_egress(t4)][2] == ("secagg-masked", "blocked")
    # a run that aggregated nothing trained nothing: it leaves no adapter and no checkpoint
    assert not (t4 / "adapter").exists()
    assert not (t4 / "checkpoints" / "round-1").exists()
