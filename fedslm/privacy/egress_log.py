"""The egress log: every message a site sends (or blocks), recorded in its ledger file first.

A table beside the ledger's entries, in the same SQLite file and with the same guarantees: one
transaction per record, a hash chain of its own (each record carries the previous one's hash,
the head is kept in the ledger's metadata), so a deleted or edited record is detected. A
record holds what ``fedslm.egress.describe`` says about the message: tensor names, shapes,
dtypes, byte counts and sha256, and every metric and field with its value. Never data.

Written before the message leaves: a crash afterwards leaves a record of a message that may
not have arrived, never a message without a record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from fedslm.privacy.ledger import (
    GENESIS_HASH,
    LedgerError,
    PrivacyLedger,
    chain_problems,
    entry_hash,
    format_time,
)

STATUSES = ("sent", "blocked")

_TABLE = """
CREATE TABLE IF NOT EXISTS egress (
    seq       INTEGER PRIMARY KEY,
    job_id    TEXT    NOT NULL,
    round     INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    status    TEXT    NOT NULL,
    record    TEXT    NOT NULL,
    time      REAL    NOT NULL,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL UNIQUE
)
"""


@dataclass(frozen=True)
class EgressEntry:
    """One message a site sent (``status`` 'sent') or stopped (``'blocked'``)."""

    seq: int
    job_id: str
    round: int
    kind: str
    status: str
    record: dict[str, Any]
    time: float
    prev_hash: str
    hash: str


def record_egress(
    ledger: PrivacyLedger,
    job_id: str,
    round: int,
    status: str,
    record: dict[str, Any],
    *,
    now: float | None = None,
) -> EgressEntry:
    """Append one egress record in one transaction and return it."""
    if status not in STATUSES:
        raise LedgerError(f"egress status must be one of {STATUSES}, got {status!r}")
    t = time.time() if now is None else float(now)
    with ledger.transaction("recording a message in the egress log") as conn:
        conn.execute(_TABLE)
        last = conn.execute(
            "SELECT seq, hash, time FROM egress ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if last is not None and t < last[2]:
            raise LedgerError(
                f"{ledger.path}: the clock went backwards: now is {format_time(t)} but the last "
                f"egress record (seq {last[0]}) is from {format_time(last[2])}. Fix the system "
                "clock (NTP); nothing was written and nothing was sent."
            )
        body = {
            "seq": 1 if last is None else int(last[0]) + 1,
            "job_id": job_id,
            "round": int(round),
            "kind": str(record["kind"]),
            "status": status,
            "record": json.loads(json.dumps(record, sort_keys=True)),  # what the table keeps
            "time": t,
            "prev_hash": GENESIS_HASH if last is None else str(last[1]),
        }
        entry = EgressEntry(**body, hash=entry_hash(body))
        conn.execute(
            "INSERT INTO egress (seq, job_id, round, kind, status, record, time, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.seq, entry.job_id, entry.round, entry.kind, entry.status,
                json.dumps(entry.record, sort_keys=True), entry.time, entry.prev_hash, entry.hash,
            ),
        )  # fmt: skip
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("egress_head_seq", str(entry.seq)), ("egress_head_hash", entry.hash)],
        )
    return entry


def egress_entries(ledger: PrivacyLedger, job_id: str | None = None) -> list[EgressEntry]:
    """Every egress record, in order (only ``job_id``'s if given)."""
    return _read(ledger, job_id)[0]


def verify_egress(ledger: PrivacyLedger) -> list[str]:
    """The first break in the egress log's chain, as one message (empty: intact)."""
    entries, head = _read(ledger, None)
    problems = chain_problems(entries, head)
    return [f"egress log: {p}" for p in problems]


def _read(
    ledger: PrivacyLedger, job_id: str | None
) -> tuple[list[EgressEntry], tuple[int, str] | None]:
    with ledger.reading("reading the egress log") as conn:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'egress'"
        ).fetchone()
        rows = (
            conn.execute(
                "SELECT seq, job_id, round, kind, status, record, time, prev_hash, hash "
                "FROM egress ORDER BY seq"
            ).fetchall()
            if exists
            else []
        )
        seq, digest = ledger.meta("egress_head_seq"), ledger.meta("egress_head_hash")
    entries = []
    for r in rows:
        try:
            record = json.loads(r[5])
        except json.JSONDecodeError:
            record = {"unreadable": r[5]}  # the chain check will name it
        entries.append(EgressEntry(r[0], r[1], r[2], r[3], r[4], record, r[6], r[7], r[8]))
    head = None
    if seq is not None and digest is not None:
        head = (int(seq) if seq.isdigit() else -1, digest)
    if job_id is not None:
        entries = [e for e in entries if e.job_id == job_id]
    return entries, head
