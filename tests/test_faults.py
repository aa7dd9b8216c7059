"""Faults surface as one clear line, early, and leave nothing that passes for a result.

Issue 15, item 6: ledger and policy faults before Ray starts, a site that fails while
``min_sites`` holds, a run killed in round 2, and CLI input that used to end in a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedslm.cli import main
from fedslm.config import load_config
from fedslm.coordinator import SiteReport
from fedslm.job import plan_job, prepare_job, site_policies
from fedslm.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

# a job small enough that a round takes seconds on two cores: 2 sites, 3 rounds, DP on
TINY = """\
seed: 1
model: {name: tiny-bert}
task: {type: classification}
lora: {r: 2, alpha: 4}
train: {mode: lora, local_epochs: 1, batch_size: 32, learning_rate: 0.05, max_length: 32}
privacy: {enabled: true, target_epsilon: 8.0, delta: 1.0e-5, max_grad_norm: 1.0}
federation: {sites: 2, rounds: 3, min_sites: 1}
data:
  synthetic: {rows_per_site: 120}
"""


def tiny_job(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "job.yaml"
    cfg.write_text(TINY + extra)
    return cfg


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting input error exit 2; return stderr (no traceback allowed)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


# -------------------------------------------------------------------------------------------
# CLI input that used to end in a traceback, or in an unclear message


def test_a_folder_given_as_the_config_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    rows = "".join(f"message {i} about my card,{'a' if i % 2 else 'b'}\n" for i in range(40))
    (tmp_path / "data.csv").write_text("text,label\n" + rows)
    policy = tmp_path / "policy.yaml"
    policy.write_text("data: data.csv\n")
    for argv in (
        ["simulate", str(folder), "--out", str(tmp_path / "out")],
        ["policy", "check", str(folder)],
        ["policy", "check", str(policy), "--job", str(folder)],
    ):
        err = fails(argv, capsys)
        assert f"{folder}: is a folder" in err, argv
        assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_report_out_naming_an_existing_file_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "report.txt"
    target.write_text("keep me\n")
    err = fails(["report", str(run), "--out", str(target)], capsys)
    assert f"--out {target}: is a file" in err
    assert target.read_text() == "keep me\n"


def test_zero_sites_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_job(tmp_path)
    err = fails(
        ["simulate", str(cfg), "--out", str(tmp_path / "out"), "--set", "federation.sites=0"],
        capsys,
    )
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert problems == [
        "  - federation.sites: Input should be greater than or equal to 1 (got 0) [from --set]"
    ], err
    assert "constrained-int" not in err and "valid list" not in err


def test_a_megabyte_text_field_names_the_row_and_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = "".join(f"message number {i} about my card,{'a' if i % 2 else 'b'}\n" for i in range(40))
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + rows + '"' + "x" * 1_000_000 + '",a\n' + rows)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "model: {name: tiny-bert}\nfederation: {sites: 2, rounds: 1}\n"
        f"data:\n  path: {data}\n  split: {{method: iid}}\n"
    )
    err = fails(["simulate", str(cfg), "--out", str(tmp_path / "out")], capsys)
    assert "data.csv: row 41 (line 42)" in err, err
    assert "131,072 characters" in err
    assert "quoting" not in err


def test_an_empty_config_says_it_runs_the_default_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    blocker = tmp_path / "out"
    blocker.write_text("a file where the run folder would go")
    # stops at --out, after the config was read: the notice comes first
    main(["simulate", str(empty), "--out", str(blocker)])
    err = capsys.readouterr().err
    assert f"{empty} sets nothing: running the default job" in err, err


# -------------------------------------------------------------------------------------------
# Ledger and policy faults: before Ray starts, one line per site naming the ledger file


def test_a_relative_ledger_path_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path
) -> None:
    cfg = tiny_job(tmp_path / "jobs", "policy:\n  sites:\n    site-1: {ledger: ledgers/one.db}\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_config(cfg)
    policies = site_policies(job, str(cfg))
    assert Path(policies["site-1"].ledger) == (tmp_path / "jobs" / "ledgers" / "one.db").resolve()


def _ledger_for_other_data(path: Path) -> None:
    with PrivacyLedger(path, "0" * 64):
        pass


@pytest.mark.parametrize("fault", ["corrupt", "other-data-set", "locked", "immutable"])
def test_a_ledger_fault_is_one_line_per_site_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bert: Path, fault: str
) -> None:
    ledger = tmp_path / "jobs" / "site1.db"
    cfg = tiny_job(tmp_path / "jobs", "policy:\n  sites:\n    site-1: {ledger: site1.db}\n")
    out = tmp_path / "out"
    held: sqlite3.Connection | None = None
    immutable = False
    if fault == "corrupt":
        ledger.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    elif fault == "other-data-set":
        _ledger_for_other_data(ledger)
    else:
        # a new ledger, bound to no data set yet: the fault is in the file's state
        with PrivacyLedger(ledger):
            pass
    if fault == "locked":
        held = sqlite3.connect(ledger, isolation_level=None)
        held.execute("BEGIN IMMEDIATE")  # another process in the middle of its write
    if fault == "immutable":
        done = subprocess.run(["chattr", "+i", str(ledger)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()}")
        immutable = True
    try:
        started = time.monotonic()
        err = fails(["simulate", str(cfg), "--out", str(out)], capsys)
        elapsed = time.monotonic() - started
    finally:
        if held is not None:
            held.close()
        if immutable:
            subprocess.run(["chattr", "-i", str(ledger)], check=True)
    lines = [line.strip() for line in err.splitlines()]
    assert "1 site(s) cannot use their privacy ledger; nothing was written:" in lines[0], err
    expected = {
        "corrupt": "not a readable privacy ledger",
        "other-data-set": "ledger belongs to data set 0000",
        "locked": "ledger is locked by another process",
        "immutable": "read-only (or immutable)",
    }[fault]
    mine = [line for line in lines if line.startswith(f"site site-1: ledger {ledger}: ")]
    assert len(mine) == 1 and expected in mine[0], err
    assert not any("site-2" in line for line in lines), err
    assert not out.exists()
    assert "ray" not in err.lower() and elapsed < 60


def test_one_ledger_named_for_every_site_is_a_fault_of_the_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bert: Path
) -> None:
    cfg = tiny_job(tmp_path, "policy:\n  default: {ledger: shared.db}\n")
    err = fails(["simulate", str(cfg), "--out", str(tmp_path / "out")], capsys)
    shared = tmp_path / "shared.db"
    assert f"site site-2: ledger {shared}: is also the ledger of site site-1" in err, err
    assert not (tmp_path / "out").exists() and not shared.exists()


def test_a_job_every_policy_refuses_stops_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bert: Path
) -> None:
    cfg = tiny_job(tmp_path, "policy:\n  default: {max_rounds: 2}\n")
    err = fails(["simulate", str(cfg), "--out", str(tmp_path / "out")], capsys)
    assert "2 of 2 sites refuse this job" in err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------
# What a run leaves: nothing that passes for a result when nothing trained; every round
# that finished, when it finished


@pytest.fixture
def prepared(tmp_path: Path, tiny_bert: Path):
    cfg = tiny_job(tmp_path / "job")
    return prepare_job(load_config(cfg), str(cfg), tmp_path / "run")


def _update(c, site: str, shift: float) -> SiteReport:
    # the job aggregates FFA-LoRA: A stays at its shared initialisation
    state = {k: v if ".lora_A." in k else v + shift for k, v in c.state.items()}
    return SiteReport(site, state, 96, 1.0, 3, 0.1, 8, None, None, None, None, None)


def test_a_run_that_trained_nothing_leaves_no_adapter(prepared) -> None:
    from fedslm.job import make_coordinator

    c = make_coordinator(prepared)
    c.start_round(1)
    assert c.aggregate(1, [], ["node 7: site site-1: broken"], {}) is None
    c.end_round()
    summary = c.finish()
    out = prepared.out
    assert not (out / "adapter").exists()
    assert not (out / "checkpoints").exists()
    assert summary["run"]["status"] == "incomplete" and summary["run"]["adapter"] is False
    assert json.loads((out / "privacy.json").read_text())["run"]["rounds_finished"] == 0


def test_an_aggregated_round_is_on_disk_before_its_evaluation(prepared) -> None:
    from fedslm.coordinator import SiteEval
    from fedslm.job import make_coordinator

    c = make_coordinator(prepared)
    c.start_round(1)
    assert c.aggregate(1, [_update(c, "site-1", 0.01), _update(c, "site-2", 0.02)], []) is not None
    c.save_round()  # what the round loop does before sending round 2
    out = prepared.out
    assert (out / "checkpoints" / "round-1" / "coordinator_state.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["evaluated"]) for x in lines] == [(1, False)]
    status = json.loads((out / "privacy.json").read_text())["run"]
    assert status["status"] == "incomplete" and status["rounds_finished"] == 1
    assert not status["stopped"]
    c.record_evaluation([SiteEval("site-1", 0.5, 0.75, 24)], [])
    c.end_round()  # the evaluation arrived with round 2's replies: the line is completed
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["evaluated"], x["eval_accuracy"]) for x in lines] == [(1, True, 0.75)]


def test_a_run_resumed_before_a_rounds_evaluation_completes_its_line(prepared) -> None:
    from fedslm.coordinator import SiteEval
    from fedslm.job import make_coordinator

    c = make_coordinator(prepared)
    c.start_round(1)
    assert c.aggregate(1, [_update(c, "site-1", 0.01)], []) is not None
    c.save_round()  # then the coordinator dies while round 2 trains
    resumed = make_coordinator(prepared)
    assert resumed.resume() == 1
    assert resumed.pending_evaluation == 1
    torch.testing.assert_close(resumed.state, c.state)
    resumed.record_evaluation([SiteEval("site-1", 0.5, 0.75, 24)], [])
    resumed.end_round()
    lines = [json.loads(x) for x in (prepared.out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["evaluated"], x["eval_accuracy"]) for x in lines] == [(1, True, 0.75)]
    assert resumed.pending_evaluation is None
    resumed.start_round(2)  # the run goes on with round 2 as usual
    assert resumed.aggregate(2, [_update(resumed, "site-1", 0.01)], []) is not None
    resumed.end_round()
    lines = [json.loads(x) for x in (prepared.out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]


# -------------------------------------------------------------------------------------------
# Through Flower's simulation engine (Ray): a failing site, and a run killed in round 2


def test_a_site_that_fails_while_min_sites_holds_is_named_and_the_run_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bert: Path
) -> None:
    from fedslm.server.simulation import simulate

    from fedslm.cli import _print_summary
    from fedslm.privacy.ledger import simulated_ledger_dir
    from fedslm.progress import Reporter

    cfg = tiny_job(tmp_path / "job")
    job = load_config(cfg, ["federation.sites=3", "federation.min_sites=2", "federation.rounds=1"])
    out = tmp_path / "run"
    prepared = plan_job(job, str(cfg)).write(out, simulated_ledger_dir())
    prepared.sites[2].files.train.write_text("not json\n")  # site-3 breaks in round 1
    reporter = Reporter(quiet=True)
    simulate(prepared, reporter)
    code = _print_summary(out, reporter, [s.name for s in prepared.sites])
    err = capsys.readouterr().err
    assert code == 1, err
    absent = [line for line in err.splitlines() if line.startswith("warning: did not take part")]
    assert len(absent) == 1, err
    assert "round 1: site-3 failed: " in absent[0] and "train.jsonl: line 1: invalid JSON" in err
    assert "INCOMPLETE: 1 of 3 sites failed in some round (site-3)" in err
    assert "Traceback" not in err and "RayTaskError" not in err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["aggregated"] and sorted(record["sites"]) == ["site-1", "site-2"]
    # one line for its training message, one for the evaluation that rode on the last round
    training = [f for f in record["failures"] if not f.startswith("evaluate: ")]
    (failure,) = training
    assert "site site-3: " in failure and "\n" not in failure


def _descendants(pid: int, names: dict[int, str] | None = None) -> list[tuple[int, float]]:
    """Every process under ``pid`` (id and start time); ``names`` collects their commands."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            out.append((p.pid, p.create_time()))
            if names is not None:
                names[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            continue
    return out


def _still_running(procs: list[tuple[int, float]]) -> list[str]:
    alive = []
    for pid, created in procs:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            continue
    return alive


def test_a_run_killed_in_round_2_keeps_round_1_and_leaves_no_ray_process(
    tmp_path: Path, tiny_bert: Path
) -> None:
    cfg = tmp_path / "job" / "job.yaml"
    cfg.parent.mkdir()
    # rounds long enough (a few seconds) that round 2 is still training when the test, which
    # polls the log, sees its first step and kills the run; 3 steps a round finished round 2
    # before the kill on a fast machine
    cfg.write_text(TINY.replace("local_epochs: 1", "local_steps: 200"))
    out = tmp_path / "run"
    log = tmp_path / "simulate.log"
    with log.open("w") as fh:
        run = subprocess.Popen(
            [sys.executable, "-m", "fedslm.cli", "simulate", str(cfg), "--out", str(out)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},  # each progress line as it happens
        )
    seen: list[tuple[int, float]] = []
    names: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while "round 2 step" not in log.read_text():  # a site is training round 2
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            seen = sorted(set(seen) | set(_descendants(run.pid, names)))
            time.sleep(0.2)
        seen = sorted(set(seen) | set(_descendants(run.pid, names)))
        run.send_signal(signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
    assert any("raylet" in cmd for cmd in names.values()), names
    assert any("ray::" in cmd for cmd in names.values()), names  # agents and site workers
    # Ray's processes (and the watchdog) end with the run
    deadline = time.monotonic() + 20
    while _still_running(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _still_running(seen) == []

    # round 1 is on disk as it finished: checkpoint, metrics line, privacy.json
    assert (out / "checkpoints" / "round-1" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints" / "round-2").exists()
    assert not (out / "adapter").exists()  # no final adapter from an unfinished run
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1]
    status = json.loads((out / "privacy.json").read_text())["run"]
    assert status["status"] == "incomplete" and status["rounds_finished"] == 1

    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    report = subprocess.run(
        [sys.executable, "-m", "fedslm.cli", "report", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert report.returncode == 0, report.stderr
    assert "run interrupted after round 1 of 3" in report.stderr
    summary = json.loads((out / "report.json").read_text())["summary"]["trained"]
    assert summary.startswith("INCOMPLETE: run interrupted after round 1 of 3")
    verify = subprocess.run(
        [sys.executable, "-m", "fedslm.cli", "verify", str(out), "--allow-unsigned"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "verify OK" in verify.stdout and "run interrupted after round 1 of 3" in verify.stdout


def test_report_on_a_run_killed_before_round_1_finished_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedslm.runfolder import write_marker

    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "simulate", "job.yaml")
    err = fails(["report", str(run)], capsys)
    assert "run interrupted before its first round finished" in err
    assert main(["verify", str(run)]) == 2
    assert "run interrupted before its first round finished" in capsys.readouterr().err


def test_the_watchdog_kills_what_a_killed_run_left(tmp_path: Path) -> None:
    """The reaper alone, on a plain process tree: a grandchild that outlives its SIGKILLed
    grandparent (as Ray's agents do) is ended; unrelated processes are not touched."""
    script = (
        "import subprocess, sys, time\n"
        "from fedslm.reaper import start_reaper\n"
        "start_reaper()\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    run = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # the watchdog looks every half second
        left = _descendants(run.pid)
        assert len(left) == 2  # the watchdog and the sleeper
        run.kill()
        run.wait(10)
        deadline = time.monotonic() + 10
        while _still_running(left) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _still_running(left) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        run.kill()
