"""``--overwrite`` replaces only a fedslm run, only once the new job is valid, and never a
privacy ledger; simulated ledgers belong to their data set, so repeated runs compose.

Each test reproduces one way the old ``--overwrite`` lost data or reset a budget (issue 15).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedslm.cli import main
from fedslm.privacy.ledger import PrivacyLedger
from fedslm.report_cli import report_cmd, verify_cmd
from fedslm.runfolder import MARKER, write_marker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SMALL = ["--set", "data.synthetic.rows_per_site=200", "--set", "federation.rounds=1"]


def old_run(out: Path) -> Path:
    """A finished run's folder as far as --overwrite can tell: the marker and an output."""
    out.mkdir(parents=True)
    write_marker(out, "simulate", "old.yaml")
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    return out


def simulate(out: Path, *more: str) -> int:
    return main(["simulate", str(SMOKE), "--out", str(out), *SMALL, *more])


def job_with_data(folder: Path, data: Path) -> Path:
    cfg = folder / "job.yaml"
    cfg.write_text(
        "model:\n  name: tiny-bert\nfederation:\n  sites: 2\n  rounds: 1\n"
        f"train:\n  local_steps: 1\n  batch_size: 4\ndata:\n  path: {data}\n"
    )
    return cfg


def test_overwrite_with_a_bad_data_path_keeps_the_old_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = old_run(tmp_path / "run")
    cfg = job_with_data(tmp_path, tmp_path / "missing.csv")
    assert main(["simulate", str(cfg), "--out", str(out), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err and err.count("\n") == 1
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_overwrite_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter-1.tex").write_text("years of work\n")
    assert simulate(out, "--overwrite", "-q") == 2
    err = capsys.readouterr().err
    assert f"--out {out}: is not a fedslm run (no {MARKER})" in err
    assert (out / "chapter-1.tex").read_text() == "years of work\n"


def test_overwrite_refuses_the_folder_holding_the_config_and_data(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    rows = "".join(f"message number {i} about my card,{'a' if i % 2 else 'b'}\n" for i in range(40))
    data = project / "data.csv"
    data.write_text("text,label\n" + rows)
    cfg = job_with_data(project, data)
    write_marker(project, "simulate", str(cfg))  # even marked as a run, it holds the inputs
    for out in (project, tmp_path):
        assert main(["simulate", str(cfg), "--out", str(out), "--overwrite", "-q"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: holds this job's input {cfg}" in err
    assert cfg.is_file() and data.read_text().endswith(rows)


def test_out_holding_the_ledger_folder_is_refused(
    tmp_path: Path,
    tiny_bert: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv("FEDSLM_LEDGERS", str(out / "ledgers"))
    assert simulate(out, "-q") == 2
    assert f"--out {out}: holds this job's input {out / 'ledgers'}" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_never_deletes_a_ledger(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run made before ledgers moved out of run folders keeps its ledger in the run."""
    out = old_run(tmp_path / "run")
    (out / "sites" / "site-1").mkdir(parents=True)
    ledger = out / "sites" / "site-1" / "ledger.db"
    PrivacyLedger(ledger).close()
    assert simulate(out, "--overwrite", "-q") == 2
    err = capsys.readouterr().err
    assert f"holds {ledger}, an SQLite file" in err and "never deletes a ledger" in err
    assert ledger.is_file() and (out / "metrics.jsonl").is_file()


def test_out_naming_a_file_is_one_clear_error(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.txt"
    out.write_text("x")
    assert simulate(out, "--overwrite", "-q") == 2
    assert f"--out {out}: is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "x"


def _privacy(run: Path) -> dict:
    return json.loads((run / "privacy.json").read_text())


def _jobs(ledger: Path) -> list[str]:
    with PrivacyLedger(ledger, create=False) as opened:
        return list(dict.fromkeys(e.job_id for e in opened.entries()))


def _verify(run: Path) -> int:
    return verify_cmd(argparse.Namespace(path=run, keys=[run / "sites"], allow_unsigned=False))


def test_ledgers_survive_overwrite_and_runs_on_the_same_data_compose(
    tmp_path: Path, tiny_bert: Path, ledgers: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    eps5 = ["--set", "privacy.target_epsilon=5"]
    assert simulate(a, *eps5) == 0
    err = capsys.readouterr().err
    job_a = json.loads((a / "job.json").read_text())
    ledger = Path(job_a["sites"][0]["ledger"])
    # the ledger is the data set's, outside the run, and the output says where
    assert ledger.parent == ledgers and ledger.is_file()
    assert "privacy ledgers (kept across runs; --overwrite never deletes them):" in err
    assert f"  site-1: {ledger}" in err
    assert report_cmd(argparse.Namespace(run=a, out=None, baseline=[])) == 0
    first = _privacy(a)["sites"]["site-1"]["lifetime_epsilon_site_reported"]

    # another run folder, the same records: the spend composes
    assert simulate(b, *eps5, "-q") == 0
    assert json.loads((b / "job.json").read_text())["sites"][0]["ledger"] == str(ledger)
    second = _privacy(b)["sites"]["site-1"]["lifetime_epsilon_site_reported"]
    assert second > first * 1.2
    assert _verify(a) == 0  # a's report counts the ledger up to its own job: still valid

    # --overwrite replaces the run, not the budget
    assert simulate(a, *eps5, "--overwrite", "-q") == 0
    assert ledger.is_file() and len(_jobs(ledger)) == 3
    third = _privacy(a)["sites"]["site-1"]["lifetime_epsilon_site_reported"]
    assert third > second
    assert json.loads((a / "job.json").read_text())["job_id"] != job_a["job_id"]

    # a job the budget no longer allows is refused before the run it would replace is touched
    capsys.readouterr()
    job_b = (b / "job.json").read_text()
    assert simulate(b, "--set", "privacy.target_epsilon=8", "--overwrite", "-q") == 2
    err = capsys.readouterr().err
    assert "sites refuse this job" in err and "nothing was written" in err
    assert f"site site-1 (ledger {ledger})" in err and "lifetime budget is 10" in err
    assert (b / "job.json").read_text() == job_b and len(_jobs(ledger)) == 3


def test_the_centralized_baseline_keeps_its_ledger_outside_the_run(
    tmp_path: Path, tiny_bert: Path, ledgers: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pooled"
    assert main(["centralized", str(SMOKE), "--out", str(out), *SMALL, "-q"]) == 0
    marker = json.loads((out / MARKER).read_text())
    ledger = Path(marker["ledgers"]["pooled"])
    assert ledger.parent == ledgers and len(_jobs(ledger)) == 1
    assert report_cmd(argparse.Namespace(run=out, out=None, baseline=[])) == 0  # found it
    # the pooled baseline is no site: nobody signs its report
    capsys.readouterr()
    assert verify_cmd(argparse.Namespace(path=out, keys=[], allow_unsigned=False)) == 3
    assert verify_cmd(argparse.Namespace(path=out, keys=[], allow_unsigned=True)) == 0
