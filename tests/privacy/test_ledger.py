"""Privacy ledger: persistence, hash chain, tamper detection, bad files, budget, SIGKILL."""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedslm.errors import DataError, FedSLMError
from fedslm.privacy.accounting import Segment, epsilon
from fedslm.privacy.ledger import (
    GENESIS_HASH,
    DatasetFingerprint,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    entry_hash,
)
from fedslm.privacy.ledger_cli import add_cli, show_text, verify_file

# sigma 4 keeps PLD at ~20 ms per call, so tests exercise the real accountants cheaply
SEG = Segment(0.01, 4.0, 10)
DELTA = 1e-5
DS = "a" * 64 + ":100"
OTHER = "b" * 64 + ":50"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


def _fill(path: Path, n: int = 4, dataset: str = DS) -> list[LedgerEntry]:
    with PrivacyLedger(path) as ledger:
        return [
            ledger.record(dataset, f"job-{i // 2}", i % 2 + 1, SEG, DELTA, "pld") for i in range(n)
        ]


def _sql(path: Path, *statements: str) -> None:
    """Edit the file behind the ledger's back, as a tamperer would."""
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


# --------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_of_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n', encoding="utf-8")
    fp = DatasetFingerprint.of_file(jsonl)
    assert fp.rows == 3
    assert fp.sha256 == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    assert fp.key == f"{fp.sha256}:3"

    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,label\n"two\nlines",x\nb,y\n\n', encoding="utf-8")
    assert DatasetFingerprint.of_file(csv_file).rows == 2  # quoted newline is one record

    other = tmp_path / "d.txt"
    other.write_text("x\n")
    with pytest.raises(DataError, match=r"d\.txt"):
        DatasetFingerprint.of_file(other)
    with pytest.raises(DataError, match="not found"):
        DatasetFingerprint.of_file(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------
# Entries and chain


@pytest.mark.integration
def test_entries_chain_and_epsilons(ledger_path: Path) -> None:
    with PrivacyLedger(ledger_path) as ledger:
        e1 = ledger.record(DS, "job-1", 1, SEG, DELTA, "pld", now=1000.0)
        e2 = ledger.record(DS, "job-1", 2, Segment(0.02, 4.0, 5), DELTA, "rdp", now=1001.0)
        e3 = ledger.record(OTHER, "job-9", 1, SEG, 1e-6, "pld", now=1002.0)
        assert [e.seq for e in ledger.entries()] == [1, 2, 3]
        assert ledger.datasets() == [DS, OTHER]
        assert ledger.entries(DS) == [e1, e2]
        assert ledger.segments(DS) == [SEG, Segment(0.02, 4.0, 5)]
        assert ledger.verify() == []

    # one chain per file, across data sets
    assert e1.prev_hash == GENESIS_HASH
    assert e2.prev_hash == e1.hash
    assert e3.prev_hash == e2.hash
    assert e1.hash == entry_hash(e1.to_dict())
    assert (e1.job_id, e1.round, e1.q, e1.sigma, e1.steps, e1.delta, e1.time) == (
        "job-1", 1, 0.01, 4.0, 10, DELTA, 1000.0,
    )  # fmt: skip
    # epsilon after the entry = composition of the data set's segments so far
    assert e1.epsilon == epsilon([SEG], DELTA, "pld")
    assert e2.epsilon == epsilon([SEG, Segment(0.02, 4.0, 5)], DELTA, "rdp")
    assert e2.epsilon_pld == epsilon([SEG, Segment(0.02, 4.0, 5)], DELTA, "pld")
    assert e3.epsilon == epsilon([SEG], 1e-6, "pld")  # the other data set starts from zero

    # survives closing and reopening (a fresh process per message in deployment)
    with PrivacyLedger(ledger_path) as again:
        assert again.entries() == [e1, e2, e3]
        again.record(DS, "job-2", 1, SEG, DELTA, "pld")
        assert again.verify() == []
        assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.integration
def test_record_computes_and_checks_the_callers_epsilon(ledger_path: Path) -> None:
    seg = Segment(0.05, 1.0, 20)  # PRV is quick at epsilons near 1
    with PrivacyLedger(ledger_path) as ledger:
        eps = epsilon([seg], DELTA, "prv")
        entry = ledger.record(DS, "j", 1, seg, DELTA, "prv", epsilon=eps)
        assert entry.epsilon == pytest.approx(eps, rel=1e-9)
        assert entry.epsilon_pld == epsilon([seg], DELTA, "pld")
        # a site that composed only its own job (and forgot the earlier one) is caught
        with pytest.raises(LedgerError, match="disagrees"):
            ledger.record(DS, "j2", 1, seg, DELTA, "prv", epsilon=eps)
        assert len(ledger.entries()) == 1


def test_recording_the_same_round_twice_counts_once(ledger_path: Path) -> None:
    with PrivacyLedger(ledger_path) as ledger:
        first = ledger.record(DS, "job", 3, SEG, DELTA, "pld", now=10.0)
        again = ledger.record(DS, "job", 3, SEG, DELTA, "pld", now=20.0)
        assert again == first
        assert ledger.segments(DS) == [SEG]
        with pytest.raises(LedgerError, match="already recorded"):
            ledger.record(DS, "job", 3, Segment(0.01, 4.0, 11), DELTA, "pld")
        with pytest.raises(LedgerError, match="already recorded"):
            ledger.record(DS, "job", 3, SEG, 1e-6, "pld")
        assert ledger.entries() == [first]
        # the same job and round on another data set is another entry
        ledger.record(OTHER, "job", 3, SEG, DELTA, "pld", now=30.0)
        assert len(ledger.entries()) == 2


def test_clock_going_backwards_is_refused_and_nothing_written(ledger_path: Path) -> None:
    with PrivacyLedger(ledger_path) as ledger:
        ledger.record(DS, "job", 1, SEG, DELTA, "pld", now=5000.0)
    before = ledger_path.read_bytes()
    with PrivacyLedger(ledger_path) as ledger:
        with pytest.raises(LedgerError, match="clock went backwards"):
            ledger.record(DS, "job", 2, SEG, DELTA, "pld", now=4999.0)
        # the chain is per file, so another data set cannot go back in time either
        with pytest.raises(LedgerError, match="clock went backwards"):
            ledger.record(OTHER, "job", 1, SEG, DELTA, "pld", now=1.0)
        assert len(ledger.entries()) == 1
        assert ledger.verify() == []
        ledger.record(DS, "job", 2, SEG, DELTA, "pld", now=5000.0)  # equal time is fine
    assert len(before) > 0


# --------------------------------------------------------------------------------------------
# Tampering


def _rewrite_chain(path: Path) -> None:
    """Recompute every hash after an edit: the tamperer who knows the format."""
    conn = sqlite3.connect(path)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(entries)")]
    rows = conn.execute(f"SELECT {', '.join(cols)} FROM entries ORDER BY seq").fetchall()
    prev = GENESIS_HASH
    for row in rows:
        body = dict(zip(cols, row, strict=True))
        body["prev_hash"] = prev
        body["hash"] = entry_hash(body)
        conn.execute(
            "UPDATE entries SET prev_hash = ?, hash = ? WHERE seq = ?",
            (body["prev_hash"], body["hash"], body["seq"]),
        )
        prev = body["hash"]
    conn.execute("UPDATE meta SET value = ? WHERE key = 'head_hash'", (prev,))
    conn.commit()
    conn.close()


def _swap_rows(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE entries SET seq = -2 WHERE seq = 2")
    conn.execute("UPDATE entries SET seq = 2 WHERE seq = 3")
    conn.execute("UPDATE entries SET seq = 3 WHERE seq = -2")
    conn.commit()
    conn.close()


TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "sigma edited": (
        lambda p: _sql(p, "UPDATE entries SET sigma = 8.0 WHERE seq = 2"),
        r"entry seq 2: stored hash .* edited",
    ),
    "epsilon edited": (
        lambda p: _sql(p, "UPDATE entries SET epsilon = epsilon / 2 WHERE seq = 3"),
        r"entry seq 3: stored hash",
    ),
    "middle row deleted": (
        lambda p: _sql(p, "DELETE FROM entries WHERE seq = 2"),
        r"entry seq 2 is missing",
    ),
    "rows swapped": (_swap_rows, r"entry seq 2: prev_hash"),
    "last row deleted": (
        lambda p: _sql(p, "DELETE FROM entries WHERE seq = 4"),
        r"head is seq 4 .* last entry is seq 3",
    ),
    "epsilon edited and chain rewritten": (
        lambda p: (_sql(p, "UPDATE entries SET epsilon = 0.001 WHERE seq = 3"), _rewrite_chain(p)),
        r"entry seq 3: field epsilon: stored 0\.001, recomputed",
    ),
    "epsilon_pld edited and chain rewritten": (
        lambda p: (
            _sql(p, "UPDATE entries SET epsilon_pld = epsilon_pld * 1.05 WHERE seq = 2"),
            _rewrite_chain(p),
        ),
        r"entry seq 2: field epsilon_pld",
    ),
    "steps lowered and chain rewritten": (
        lambda p: (_sql(p, "UPDATE entries SET steps = 1 WHERE seq = 1"), _rewrite_chain(p)),
        r"entry seq 1: field epsilon: stored",
    ),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampering_is_detected(
    name: str, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(ledger_path)
    tamper, message = TAMPERS[name]
    tamper(ledger_path)
    with PrivacyLedger(ledger_path) as ledger:
        problems = ledger.verify()
        assert len(problems) == 1, problems
        assert re.search(message, problems[0]), problems[0]
        if "rewritten" not in name:
            # a broken chain is refused before any spend is computed from it
            with pytest.raises(LedgerError, match="integrity check"):
                ledger.spent(DS, DELTA, "pld")
            with pytest.raises(LedgerError, match="integrity check"):
                ledger.record(DS, "job-9", 1, SEG, DELTA, "pld")
    capsys.readouterr()
    assert verify_file(ledger_path) == 1
    assert "FAILED" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad files


@pytest.mark.integration
def test_corrupted_file_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    junk = random.Random(1).randbytes(8192)
    path.write_bytes(junk)
    with pytest.raises(LedgerError, match=r"ledger\.sqlite.*not a readable.*not modified"):
        PrivacyLedger(path)
    assert path.read_bytes() == junk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]  # no -wal, -shm
    assert verify_file(path) == 2

    # a real ledger whose pages were overwritten in the middle
    good = tmp_path / "good.sqlite"
    _fill(good, 40)
    data = bytearray(good.read_bytes())
    data[4096 : 4096 + 2048] = random.Random(2).randbytes(2048)
    good.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match=r"good\.sqlite"), PrivacyLedger(good) as ledger:
        ledger.verify()


def test_foreign_sqlite_file_and_empty_file_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(LedgerError, match=r"app\.db.*not a fedslm privacy ledger.*not modified"):
        PrivacyLedger(foreign)
    assert foreign.read_bytes() == before  # in particular, not switched to WAL

    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(LedgerError, match="empty"):
        PrivacyLedger(empty)
    assert empty.read_bytes() == b""


def test_locked_ledger_gives_a_clear_error_and_stays_intact(ledger_path: Path) -> None:
    entries = _fill(ledger_path, 2)
    holder = sqlite3.connect(ledger_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        with (
            pytest.raises(LedgerError, match=r"ledger\.sqlite: ledger is locked by another"),
            PrivacyLedger(ledger_path, timeout=0.3) as ledger,
        ):
            ledger.record(DS, "job-5", 1, SEG, DELTA, "pld")
        assert time.monotonic() - t0 < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with PrivacyLedger(ledger_path) as ledger:
        assert ledger.entries() == entries
        assert ledger.verify() == []
        ledger.record(DS, "job-5", 1, SEG, DELTA, "pld")


def test_ledger_of_another_data_set_is_refused(tmp_path: Path) -> None:
    data_a, data_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    data_a.write_text('{"t": 1}\n{"t": 2}\n')
    data_b.write_text('{"t": 1}\n')
    fp_a, fp_b = DatasetFingerprint.of_file(data_a), DatasetFingerprint.of_file(data_b)
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path, fp_a) as ledger:
        assert ledger.bound_dataset == fp_a.key
        ledger.record(fp_a, "job", 1, SEG, DELTA, "pld")
        with pytest.raises(LedgerError, match="belongs to data set"):
            ledger.record(fp_b, "job", 1, SEG, DELTA, "pld")
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=f"belongs to data set {fp_a.key}, not {fp_b.key}"):
        PrivacyLedger(path, fp_b)
    assert path.read_bytes() == before
    # the data file changed (a row appended): its fingerprint no longer matches the ledger
    data_a.write_text('{"t": 1}\n{"t": 2}\n{"t": 3}\n')
    with pytest.raises(LedgerError, match="belongs to data set"):
        PrivacyLedger(path, DatasetFingerprint.of_file(data_a))
    with PrivacyLedger(path, fp_a) as ledger:
        assert len(ledger.entries()) == 1

    # an unbound ledger holding other data sets cannot be bound to one of them afterwards
    shared = tmp_path / "shared.sqlite"
    _fill(shared, 1, dataset=OTHER)
    with pytest.raises(LedgerError, match="already holds entries"):
        PrivacyLedger(shared, fp_a)


# --------------------------------------------------------------------------------------------
# Budget


@pytest.mark.integration
def test_budget_arithmetic_matches_the_accountant(ledger_path: Path) -> None:
    segs = [Segment(0.01, 4.0, 200), Segment(0.02, 3.0, 100)]
    with PrivacyLedger(ledger_path) as ledger:
        assert ledger.spent(DS, DELTA) == 0.0
        for i, s in enumerate(segs):
            ledger.record(DS, "job", i + 1, s, DELTA, "pld")
        spent = ledger.spent(DS, DELTA, "pld")
        assert spent == epsilon(segs, DELTA, "pld")
        # the reported accountant composes the same segments
        assert ledger.spent(DS, DELTA) == epsilon(segs, DELTA, "prv")
        # spend at another delta is recomputed from the segments, not read from entries
        assert ledger.spent(DS, 1e-7, "pld") == epsilon(segs, 1e-7, "pld")
        assert ledger.spent(DS, 1e-7, "pld") > spent

        assert issubclass(LedgerError, FedSLMError)
        assert ledger.spent(OTHER, DELTA) == 0.0  # untouched data set


# --------------------------------------------------------------------------------------------
# CLI functions


def test_cli_show_and_verify(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(ledger_path, 3)
    parser = argparse.ArgumentParser(prog="fedslm")
    add_cli(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["ledger", "show", str(ledger_path), "--budget", "8"])
    assert args.command == "ledger"
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert DS in out
    assert "3 entries" in out
    assert "budget 8: left" in out
    assert "(pld)" in out

    args = parser.parse_args(["ledger", "verify", str(ledger_path)])
    assert args.handler(args) == 0
    assert "OK, 3 entries" in capsys.readouterr().out

    _sql(ledger_path, "UPDATE entries SET steps = 1 WHERE seq = 1")
    assert args.handler(args) == 1
    assert "seq 1" in capsys.readouterr().err
    assert "WARNING: integrity check failed" in show_text(ledger_path)

    missing = ledger_path.with_name("typo.sqlite")
    with pytest.raises(LedgerError, match="no privacy ledger"):
        show_text(missing)
    assert verify_file(missing) == 2
    assert not missing.exists()  # show/verify never create a ledger
    # creation is atomic (built aside, linked into place): no temporary file is left behind,
    # only the journal of the heads written
    names = sorted(p.name for p in ledger_path.parent.iterdir())
    assert names == ["ledger.sqlite", "ledger.sqlite.heads"]

    junk = ledger_path.with_name("junk.sqlite")
    junk.write_bytes(b"not a database at all" * 100)
    args = parser.parse_args(["ledger", "verify", str(junk)])
    assert args.handler(args) == 2
    with pytest.raises(LedgerError):
        show_text(junk)


# --------------------------------------------------------------------------------------------
# Crash safety

_CHILD = """
import sys
import time

from fedslm.privacy.accounting import Segment, epsilon
from fedslm.privacy.ledger import PrivacyLedger


class SlowCommit:
    # Holds each transaction open between INSERT and COMMIT, and says so, so that the test
    # can kill the process inside a transaction on purpose.
    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def execute(self, sql, *args):
        cursor = self._conn.execute(sql, *args)
        if sql.startswith("INSERT INTO entries"):
            print("tx", flush=True)
            time.sleep(0.5)
        return cursor


path, dataset, job, mode = sys.argv[1:5]
epsilon([Segment(0.01, 4.0, 10)], 1e-5, "pld")  # import dp-accounting before the clock starts
with PrivacyLedger(path, dataset) as ledger:
    if mode == "slow":
        ledger._conn = SlowCommit(ledger._conn)
    print("ready", flush=True)
    rnd = 0
    while True:
        rnd += 1
        # a restarted site replays its rounds from 1: recorded ones must come back unchanged
        e = ledger.record(dataset, job, rnd, Segment(0.01, 4.0, 10), 1e-5, "pld")
        print(e.seq, e.round, flush=True)
"""


@pytest.mark.integration
def test_sigkill_loses_no_committed_entry_and_counts_no_step_twice(ledger_path: Path) -> None:
    """Six restarts of a recording site, each ended by SIGKILL.

    Odd runs are killed at a random moment (anywhere: computing, replaying, writing); even
    runs are killed right after the child reports an INSERT whose COMMIT is 0.5 s away, so
    at least three kills land inside a transaction, whose entry must then be absent.
    """
    rng = random.Random(20240611)
    reported: dict[int, tuple[str, int]] = {}  # seq -> (job, round) the child saw committed
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    count = 0
    for run in range(6):
        job = f"job-{run % 3}"  # three jobs on the same data set, each restarted
        in_transaction = run % 2 == 0
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(ledger_path), DS, job,
             "slow" if in_transaction else "fast"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        seen: list[str] = []
        if in_transaction:
            target = rng.randint(1, 3)  # kill inside the target-th new transaction
            while seen.count("tx") < target:
                line = child.stdout.readline()
                assert line, child.stderr.read()
                seen.append(line.strip())
        else:
            time.sleep(rng.uniform(0.05, 1.0))
        os.kill(child.pid, signal.SIGKILL)
        out, err = child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL, err
        run_seqs: list[int] = []
        for line in [*seen, *out.splitlines()]:
            if line.strip() and line.strip() != "tx":
                seq, rnd = (int(w) for w in line.split())
                run_seqs.append(seq)
                assert reported.setdefault(seq, (job, rnd)) == (job, rnd)  # seq keeps meaning

        with PrivacyLedger(ledger_path, DS) as ledger:
            entries = ledger.entries()
            assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
            keys = [(e.dataset, e.job_id, e.round) for e in entries]
            assert len(keys) == len(set(keys))
            by_seq = {e.seq: e for e in entries}
            for seq, (j, rnd) in reported.items():
                assert seq in by_seq, f"committed entry {seq} lost after kill {run}"
                assert (by_seq[seq].job_id, by_seq[seq].round) == (j, rnd)
            for j in {e.job_id for e in entries}:
                rounds = sorted(e.round for e in entries if e.job_id == j)
                assert rounds == list(range(1, len(rounds) + 1))  # no gap, no repeat
            if in_transaction:
                # the killed transaction left nothing: only what the child saw committed
                assert len(entries) == max([count, *run_seqs]), f"half-written entry, kill {run}"
            count = len(entries)
    assert len(reported) >= 6, "the child hardly got to record; raise the sleep"
    with PrivacyLedger(ledger_path) as ledger:
        assert ledger.verify() == []
        entries = ledger.entries()
        # every step counted exactly once: the composed spend is that of the distinct rounds
        assert sum(s.steps for s in ledger.segments(DS)) == 10 * len(entries)
        assert entries[-1].epsilon_pld == epsilon(
            [Segment(0.01, 4.0, 10)] * len(entries), 1e-5, "pld"
        )
