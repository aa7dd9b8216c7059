"""A site's persistent privacy ledger: every DP-SGD run on a data set, composed across jobs.

A site answers for the privacy of its data set, not of one job. Each job (and, in deployment,
each round: a fresh process per message) appends one entry per round to a SQLite file kept
next to the data; the spend on a data set is the composition of every segment ever recorded
for it, so a second job on the same records starts from what the first one spent.

What the file guarantees:

- **Append-only, crash-safe.** WAL journal, ``synchronous=FULL``, one ``BEGIN IMMEDIATE`` …
  ``COMMIT`` per entry: a process killed at any instant leaves either the whole entry or
  nothing. ``UNIQUE(dataset, job_id, round)`` makes recording idempotent, so a retried round
  never counts its steps twice.
- **Tamper-evident.** Entries form a hash chain per file (each carries the hash of the one
  before; the genesis link is 64 zeros) and the file's metadata holds the head of the chain,
  so an edited, deleted, reordered or truncated entry is detected by :meth:`PrivacyLedger.verify`
  and refused before any spend is computed from it. A chain inside the file cannot stop someone
  who rewrites *every* hash: the heads the site released (privacy.json, its reports, the
  coordinator's record) and its journal of heads (``journal_path``) anchor it, and
  ``fedslm.privacy.anchors`` refuses a ledger that no longer extends them.
- **Keyed by data set.** The key is the sha256 of the data file and its row count
  (:class:`DatasetFingerprint`). A ledger may be bound to one data set, after which opening it
  for another is an error.
- **Deltas.** Each entry stores the delta its epsilon was computed at. Epsilons at different
  deltas do not compose, so spend is always recomputed from the stored (q, sigma, steps)
  segments at the delta asked for, never summed from stored epsilons.

Stored epsilons are informational; every budget decision recomputes from the segments. The
decisions themselves (budget, per-job cap, what may leave) are the site policy's
(``fedslm.policy``); the ledger only records and composes. A site, each round::

    fp = DatasetFingerprint.of_file(train_file)
    with PrivacyLedger(ledger_file, fp) as ledger:
        spent = ledger.segments(fp)                        # policy.check_round decides on it
        ledger.record(fp, job_id, round, planned, delta)   # before the update leaves the site
        ...train, reply...

Record before the update is released (simplest: before training; the number of steps is fixed
in advance). A crash after recording then over-counts at most that round, and its retry is not
counted again; recording after the reply could under-count.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedslm.errors import DataError, FedSLMError
from fedslm.privacy import accounting
from fedslm.privacy.accounting import (
    ACCOUNTANTS,
    EPSILON_TOLERANCE,
    Accountant,
    Segment,
    is_accountant,
)

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
DEFAULT_TIMEOUT = 2.0
_MAX_WRITE_ATTEMPTS = 5

_ENTRY_COLUMNS: tuple[str, ...] = (
    "seq",
    "dataset",
    "job_id",
    "round",
    "q",
    "sigma",
    "steps",
    "delta",
    "accountant",
    "epsilon",
    "epsilon_pld",
    "time",
    "prev_hash",
    "hash",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    seq         INTEGER PRIMARY KEY,
    dataset     TEXT    NOT NULL,
    job_id      TEXT    NOT NULL,
    round       INTEGER NOT NULL,
    q           REAL    NOT NULL,
    sigma       REAL    NOT NULL,
    steps       INTEGER NOT NULL,
    delta       REAL    NOT NULL,
    accountant  TEXT    NOT NULL,
    epsilon     REAL    NOT NULL,
    epsilon_pld REAL    NOT NULL,
    time        REAL    NOT NULL,
    prev_hash   TEXT    NOT NULL,
    hash        TEXT    NOT NULL UNIQUE,
    UNIQUE (dataset, job_id, round)
);
"""


class LedgerError(FedSLMError):
    """The privacy ledger cannot be used: unreadable, locked, tampered, or the input is wrong."""


# --------------------------------------------------------------------------------------------
# Data set fingerprint


@dataclass(frozen=True)
class DatasetFingerprint:
    """Identity of a data set: sha256 of the file's bytes and its number of data rows."""

    sha256: str
    rows: int

    @property
    def key(self) -> str:
        """The ledger key, ``"<sha256>:<rows>"``."""
        return f"{self.sha256}:{self.rows}"

    @classmethod
    def of_file(cls, path: str | Path) -> DatasetFingerprint:
        """Fingerprint of a ``.jsonl``, ``.csv`` or ``.parquet`` data file.

        Rows are non-empty lines for JSON Lines, records after the header for CSV (blank lines
        skipped) and the footer's row count for Parquet. Raises ``DataError`` otherwise.
        """
        from fedslm.data.tables import file_sha256

        path = Path(path)
        digest = file_sha256(path)  # DataError for a missing file or a folder
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                with path.open("rb") as fh:
                    rows = sum(1 for line in fh if line.strip())
            elif suffix == ".csv":
                with path.open(encoding="utf-8-sig", newline="") as fh:
                    records = [r for r in csv.reader(fh) if any(cell.strip() for cell in r)]
                rows = max(0, len(records) - 1)
            elif suffix == ".parquet":
                import pyarrow.parquet as pq

                rows = int(pq.ParquetFile(path).metadata.num_rows)
            else:
                raise DataError(
                    f"{path}: cannot fingerprint a '{suffix or 'extensionless'}' file for the "
                    "privacy ledger; use .jsonl, .csv or .parquet"
                )
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except (OSError, csv.Error) as exc:
            raise DataError(f"{path}: cannot count rows: {exc}") from None
        except Exception as exc:  # pyarrow raises its own types for a damaged file
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path}: cannot read Parquet metadata: {exc}") from None
        return cls(digest, rows)


# Where simulated sites keep their ledgers. A site's budget belongs to its data set, not to a
# run folder: ``fedslm simulate --overwrite`` replaces a run but must never reset the spend on
# the data it trained on, so simulated ledgers live outside every run, one file per data set.
LEDGERS_ENV = "FEDSLM_LEDGERS"
SQLITE_MAGIC = b"SQLite format 3\x00"


def simulated_ledger_dir() -> Path:
    """The folder holding simulated sites' ledgers: ``$FEDSLM_LEDGERS``, else
    ``$FEDSLM_HOME/ledgers``, else ``~/.fedslm/ledgers``.

    Not under ``~/.cache`` (where built models go by default): cache cleaners may empty that,
    and a deleted ledger is a budget reset.
    """
    if os.environ.get(LEDGERS_ENV):
        return Path(os.environ[LEDGERS_ENV]).expanduser()
    home = os.environ.get("FEDSLM_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".fedslm") / "ledgers"


def journal_path(ledger: Path) -> Path:
    """The journal of a ledger's heads, ``<ledger>.heads``: one JSON line per entry written.

    A second line of defence against a rewritten ledger (``fedslm.privacy.anchors``): it sits
    beside the ledger, so whoever can rewrite the ledger can usually rewrite it too. The heads
    the site released (privacy.json, reports, the coordinator's record) are the first line.
    """
    return ledger.with_name(ledger.name + ".heads")


def simulated_ledger_path(folder: Path, dataset: DatasetFingerprint) -> Path:
    """The ledger file of ``dataset`` in ``folder``: named by the data set's sha256, so every
    simulated run on the same records composes in the same ledger."""
    return Path(folder) / f"{dataset.sha256}.db"


def is_sqlite_file(path: Path) -> bool:
    """Whether ``path`` is an SQLite database (what a privacy ledger is), by its header.

    Used to refuse deleting a folder that holds one: any SQLite file may be a ledger (a
    policy can name any path), so none is deleted on a guess.
    """
    try:
        with Path(path).open("rb") as fh:
            return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def _key(dataset: str | DatasetFingerprint) -> str:
    key = dataset.key if isinstance(dataset, DatasetFingerprint) else str(dataset)
    if not key:
        raise LedgerError("data set key is empty; use DatasetFingerprint.of_file(path).key")
    return key


# --------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded round of DP-SGD on one data set.

    ``epsilon`` is the composition of every segment of ``dataset`` up to and including this
    entry, at ``delta`` under ``accountant``; ``epsilon_pld`` is the same under PLD (the
    independent recomputation). ``time`` is Unix seconds.
    """

    seq: int
    dataset: str
    job_id: str
    round: int
    q: float
    sigma: float
    steps: int
    delta: float
    accountant: str
    epsilon: float
    epsilon_pld: float
    time: float
    prev_hash: str
    hash: str

    @property
    def segment(self) -> Segment:
        """The (q, sigma, steps) this entry spent."""
        return Segment(self.q, self.sigma, self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def entry_hash(fields_: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an entry's fields (everything but ``hash`` itself).

    ``seq`` and ``prev_hash`` are part of it, so moving an entry breaks its hash as well as
    the link. Floats serialise with ``repr`` (exact round trip of the stored doubles).
    """
    body = {k: v for k, v in fields_.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _entry_from_row(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(*row)


def chain_problems(entries: Sequence[Any], head: tuple[int, str] | None) -> list[str]:
    """First break in a hash chain (empty if intact). Cheap: hashes only.

    ``entries`` are dataclasses with ``seq`` (1, 2, …), ``prev_hash`` and ``hash`` (the
    ``entry_hash`` of all their other fields): ledger entries, or the egress log's.
    """
    prev = GENESIS_HASH
    for i, e in enumerate(entries, start=1):
        if e.seq != i:
            missing = f"entry seq {i} is missing" if e.seq > i else f"seq {e.seq} out of order"
            return [f"{missing} (found seq {e.seq} at position {i}): the chain is broken"]
        if e.prev_hash != prev:
            return [
                f"entry seq {e.seq}: prev_hash {e.prev_hash[:16]}… does not match the hash of "
                f"the entry before it {prev[:16]}…: an entry was deleted, inserted or edited"
            ]
        recomputed = entry_hash(asdict(e))
        if recomputed != e.hash:
            return [
                f"entry seq {e.seq}: stored hash {e.hash[:16]}… differs from the hash of its "
                f"contents {recomputed[:16]}…: the entry was edited"
            ]
        prev = e.hash
    if entries and head is None:
        return ["the ledger has entries but no recorded head: its metadata was edited"]
    if head is not None:
        seq, digest = head
        last = entries[-1] if entries else None
        if last is None or last.seq != seq or last.hash != digest:
            found = f"seq {last.seq}" if last else "no entries"
            return [
                f"the ledger's head is seq {seq} ({digest[:16]}…) but the last entry is "
                f"{found}: entries at the end were deleted or replaced"
            ]
    return []


def _close(a: float, b: float, rel: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _check_accountant(accountant: str) -> Accountant:
    if not is_accountant(accountant):
        raise LedgerError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
    return accountant


def _check_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise LedgerError(f"delta must be in (0, 1), got {delta}")
    return float(delta)


# --------------------------------------------------------------------------------------------
# The ledger


class PrivacyLedger:
    """A privacy ledger file; see the module docstring for its guarantees.

    ``PrivacyLedger(path)`` creates the file if it does not exist (``create=False`` refuses
    instead). With ``dataset`` given, the file is bound to that data set on first use and refuses
    any other afterwards. ``timeout`` is how long to wait for another process's write before
    reporting the ledger as locked. Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        dataset: DatasetFingerprint | str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        if not self.path.exists():
            if not create:
                raise LedgerError(f"{self.path}: no privacy ledger at this path")
            _create_file(self.path)
        if self.path.is_dir():
            raise LedgerError(f"{self.path}: is a folder, not a privacy ledger file")
        if self.path.stat().st_size == 0:
            # Ledgers are created complete and renamed into place, so an empty file is a
            # ledger that was emptied; accepting it would restart every budget from zero.
            raise LedgerError(
                f"{self.path}: the ledger file is empty (0 bytes); restore it from a backup. "
                "If no data set was ever trained on with it, delete the file to start a new "
                "ledger. The file was not modified."
            )
        uri = f"file:{quote(str(self.path.resolve()))}?mode=rw"
        try:
            # isolation_level=None: no implicit transactions; every write is an explicit
            # BEGIN IMMEDIATE ... COMMIT so one entry is exactly one transaction.
            conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot open the privacy ledger: {exc}") from None
        self._conn = conn
        try:
            with self._translate("opening"):
                # Check before any PRAGMA that writes: switching a foreign SQLite file to WAL
                # would already modify it.
                self._check_schema()
                conn.execute("PRAGMA synchronous=FULL")
                mode_now = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode_now).lower() != "wal":
                    raise LedgerError(
                        f"{self.path}: cannot switch the ledger to WAL journaling (got "
                        f"{mode_now!r}); it needs a local file system that supports it"
                    )
                if dataset is not None:
                    self._bind(_key(dataset))
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # ---- lifecycle

    def close(self) -> None:
        """Close the file. Committed entries are already on disk."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        """The open SQLite connection (autocommit; for inspection, not for writing)."""
        if self._conn is None:
            raise LedgerError(f"{self.path}: the ledger is closed")
        return self._conn

    # ---- reading

    @property
    def bound_dataset(self) -> str | None:
        """Key of the data set this file is bound to, or None."""
        return self._meta("dataset")

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last entry as the file records it, or None if empty.

        Publish it outside the file (e.g. in a run's privacy.json) to anchor the chain: a
        later ledger whose chain does not pass through it was rewritten.
        """
        return self._head()

    def entries(self, dataset: DatasetFingerprint | str | None = None) -> list[LedgerEntry]:
        """All entries in order (of one data set if given). Does not check the chain."""
        cols = ", ".join(_ENTRY_COLUMNS)
        with self._translate("reading entries"):
            if dataset is None:
                rows = self.conn.execute(f"SELECT {cols} FROM entries ORDER BY seq").fetchall()
            else:
                rows = self.conn.execute(
                    f"SELECT {cols} FROM entries WHERE dataset = ? ORDER BY seq",
                    (_key(dataset),),
                ).fetchall()
        return [_entry_from_row(r) for r in rows]

    def datasets(self) -> list[str]:
        """Keys of the data sets with entries, in order of first entry."""
        with self._translate("reading entries"):
            rows = self.conn.execute(
                "SELECT dataset FROM entries GROUP BY dataset ORDER BY MIN(seq)"
            ).fetchall()
        return [r[0] for r in rows]

    def segments(self, dataset: DatasetFingerprint | str) -> list[Segment]:
        """Segments spent on ``dataset``, in order. Raises ``LedgerError`` on a broken chain.

        The chain check comes first because a deleted entry would under-state the spend.
        """
        return [e.segment for e in self._intact_entries(_key(dataset))]

    def spent(
        self, dataset: DatasetFingerprint | str, delta: float, accountant: Accountant = "prv"
    ) -> float:
        """Epsilon of every segment recorded for ``dataset``, composed, at ``delta``.

        Segments recorded at another delta count all the same: the mechanism ran; only the
        (epsilon, delta) reading of it changes.
        """
        return accounting.epsilon(
            self.segments(dataset), _check_delta(delta), _check_accountant(accountant)
        )

    # ---- writing

    def record(
        self,
        dataset: DatasetFingerprint | str,
        job_id: str,
        round: int,
        segment: Segment,
        delta: float,
        accountant: Accountant = "prv",
        epsilon: float | None = None,
        *,
        now: float | None = None,
    ) -> LedgerEntry:
        """Append one entry in one transaction and return it.

        The ledger computes the entry's epsilon itself (composition of every segment of the
        data set so far plus this one); if the caller passes ``epsilon`` it must agree within
        1% or ``LedgerError`` is raised. Recording the same (dataset, job_id, round) again
        returns the stored entry when (q, sigma, steps, delta, accountant) match and raises
        otherwise: a retried round never counts twice. A ``now`` (default ``time.time()``)
        earlier than the last entry's time is refused. On any error nothing is written.
        """
        key = _key(dataset)
        if not isinstance(job_id, str) or not job_id:
            raise LedgerError(f"job id must be a non-empty string, got {job_id!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise LedgerError(f"round must be an integer >= 0, got {round!r}")
        if not isinstance(segment, Segment):
            raise LedgerError(f"segment must be a Segment, got {type(segment).__name__}")
        delta = _check_delta(delta)
        accountant = _check_accountant(accountant)
        bound = self.bound_dataset
        if bound is not None and bound != key:
            raise LedgerError(self._wrong_dataset(bound, key))

        for _attempt in range(_MAX_WRITE_ATTEMPTS):
            # The accountants take up to seconds; run them outside the write lock on a
            # snapshot, then append only if the data set's entries did not change meanwhile.
            prior = self._intact_entries(key)
            for e in prior:
                if e.job_id == job_id and e.round == round:
                    return self._same_or_raise(e, segment, delta, accountant, epsilon)
            segs = [*(e.segment for e in prior), segment]
            eps = accounting.epsilon(segs, delta, accountant)
            eps_pld = eps if accountant == "pld" else accounting.epsilon(segs, delta, "pld")
            if epsilon is not None and not _close(float(epsilon), eps, EPSILON_TOLERANCE):
                raise LedgerError(
                    f"{self.path}: epsilon {epsilon:.6g} given for job {job_id!r} round {round} "
                    f"disagrees with {eps:.6g}, the composition of all {len(segs)} segments "
                    f"recorded for this data set ({accountant}, delta {delta:g}); nothing "
                    "was written"
                )
            t = time.time() if now is None else float(now)
            last_ds_seq = prior[-1].seq if prior else None
            entry = self._append(
                key, job_id, round, segment, delta, accountant, eps, eps_pld, t, last_ds_seq
            )
            if entry is not None:
                self._journal(entry)
                return entry
        raise LedgerError(
            f"{self.path}: other processes kept appending to this data set; tried "
            f"{_MAX_WRITE_ATTEMPTS} times, nothing was written"
        )

    # ---- checking

    def verify(self) -> list[str]:
        """Check the chain and recompute every stored epsilon; ``[]`` means all is well.

        Stops at the first discrepancy and returns it as one message naming the entry's
        seq, the field, and the stored vs recomputed value. The chain is checked over the
        whole file first (cheap), then epsilons entry by entry (one accountant call each).
        """
        entries, problems = self._snapshot()
        if problems:
            return problems
        bound = self.bound_dataset
        by_dataset: dict[str, list[Segment]] = {}
        seen: set[tuple[str, str, int]] = set()
        last_time = -math.inf
        for e in entries:
            if bound is not None and e.dataset != bound:
                return [f"entry seq {e.seq}: data set {e.dataset} in a ledger bound to {bound}"]
            ident = (e.dataset, e.job_id, e.round)
            if ident in seen:
                return [f"entry seq {e.seq}: job {e.job_id!r} round {e.round} recorded twice"]
            seen.add(ident)
            if e.time < last_time:
                return [f"entry seq {e.seq}: time {e.time} is earlier than the entry before it"]
            last_time = e.time
            if e.accountant not in ACCOUNTANTS:
                return [f"entry seq {e.seq}: field accountant: unknown {e.accountant!r}"]
            try:
                segs = by_dataset.setdefault(e.dataset, [])
                segs.append(e.segment)
                eps = accounting.epsilon(segs, e.delta, e.accountant)
                eps_pld = eps if e.accountant == "pld" else accounting.epsilon(segs, e.delta, "pld")
            except ValueError as exc:
                return [f"entry seq {e.seq}: invalid segment or delta: {exc}"]
            if not _close(e.epsilon, eps, EPSILON_TOLERANCE):
                return [
                    f"entry seq {e.seq}: field epsilon: stored {e.epsilon!r}, recomputed "
                    f"{eps!r} ({e.accountant}, delta {e.delta:g}, {len(segs)} segments)"
                ]
            if not _close(e.epsilon_pld, eps_pld, EPSILON_TOLERANCE):
                return [
                    f"entry seq {e.seq}: field epsilon_pld: stored {e.epsilon_pld!r}, "
                    f"recomputed {eps_pld!r} (pld, delta {e.delta:g}, {len(segs)} segments)"
                ]
        return []

    @contextmanager
    def transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction on the ledger file (BEGIN IMMEDIATE … COMMIT), errors as
        ``LedgerError`` naming ``action``; for companion tables such as the egress log."""
        with self._translate(action), self._write():
            yield self.conn

    @contextmanager
    def reading(self, action: str) -> Iterator[sqlite3.Connection]:
        """A consistent read of the ledger file (one snapshot), errors as ``LedgerError``."""
        conn = self.conn
        with self._translate(action):
            conn.execute("BEGIN")  # deferred: a read snapshot, no write lock
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def meta(self, key: str) -> str | None:
        """A value of the ledger's metadata table (None if unset)."""
        return self._meta(key)

    # ---- internals

    def _journal(self, entry: LedgerEntry) -> None:
        """Append the new head to the journal beside the ledger (``journal_path``), after the
        entry is committed: a crash in between leaves the journal one head short, which the
        anchor check reads as nothing missing."""
        line = json.dumps(
            {"seq": entry.seq, "hash": entry.hash, "job_id": entry.job_id, "round": entry.round}
        )
        path = journal_path(self.path)
        try:
            with path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise LedgerError(
                f"{path}: entry seq {entry.seq} was recorded in the ledger but its head could "
                f"not be added to the journal of heads: {exc}. Make the file writable and retry"
            ) from None

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """Turn sqlite3 errors into LedgerErrors that name the file and say what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if "locked" in text or "busy" in text:
                raise LedgerError(
                    f"{self.path}: ledger is locked by another process (waited "
                    f"{self.timeout:g} s while {action}); retry when it has finished. The "
                    "ledger was not modified."
                ) from None
            raise LedgerError(
                f"{self.path}: {action} the privacy ledger failed: {exc}. The ledger was not "
                "modified."
            ) from None
        except sqlite3.IntegrityError as exc:
            raise LedgerError(
                f"{self.path}: {action} conflicts with an entry already in the ledger ({exc}). "
                "Nothing was written."
            ) from None
        except sqlite3.DatabaseError as exc:
            raise LedgerError(
                f"{self.path}: not a readable privacy ledger ({exc}); it may be corrupted or "
                "not a ledger at all. Restore it from a backup. The ledger was not modified."
            ) from None

    def _check_schema(self) -> None:
        tables = {
            r[0]
            for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            ).fetchall()
        }
        if not {"meta", "entries"} <= tables:
            raise LedgerError(
                f"{self.path}: is an SQLite file but not a fedslm privacy ledger (tables: "
                f"{', '.join(sorted(tables)) or 'none'}). The file was not modified."
            )
        columns = tuple(r[1] for r in self.conn.execute("PRAGMA table_info(entries)"))
        if columns != _ENTRY_COLUMNS:
            raise LedgerError(
                f"{self.path}: the ledger's entries table has columns {', '.join(columns)}, "
                f"expected {', '.join(_ENTRY_COLUMNS)}. The file was not modified."
            )
        version = self._meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise LedgerError(
                f"{self.path}: ledger schema version {version!r}, this fedslm reads version "
                f"{SCHEMA_VERSION}. The file was not modified."
            )

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction: BEGIN IMMEDIATE … COMMIT, rolled back on any error."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        with self._translate("reading metadata"):
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _head(self) -> tuple[int, str] | None:
        seq, digest = self._meta("head_seq"), self._meta("head_hash")
        if seq is None or digest is None:
            return None
        try:
            return int(seq), digest
        except ValueError:
            return -1, digest  # an edited head never matches a real entry

    def _snapshot(self) -> tuple[list[LedgerEntry], list[str]]:
        """All entries and the chain check, read in one transaction.

        Entries and the head are written together; reading them in two autocommit statements
        could see another process's append in between and report a false truncation.
        """
        conn = self.conn
        with self._translate("reading entries"):
            conn.execute("BEGIN")  # deferred: a read snapshot, no write lock
            try:
                entries = self.entries()
                head = self._head()
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        return entries, chain_problems(entries, head)

    def check_dataset(self, dataset: DatasetFingerprint | str) -> None:
        """Raise ``LedgerError`` if the ledger is bound to another data set. Reads only."""
        bound, key = self.bound_dataset, _key(dataset)
        if bound is not None and bound != key:
            raise LedgerError(self._wrong_dataset(bound, key))

    def _wrong_dataset(self, bound: str, key: str) -> str:
        return (
            f"{self.path}: ledger belongs to data set {bound}, not {key}. Use the ledger kept "
            "for this data set (each data file has its own), or check that the data file has "
            "not changed. The ledger was not modified."
        )

    def _bind(self, key: str) -> None:
        bound = self._meta("dataset")
        if bound == key:
            return
        if bound is not None:
            raise LedgerError(self._wrong_dataset(bound, key))
        with self._translate("binding the ledger to its data set"), self._write():
            # Re-read under the lock: another process may have bound it meanwhile.
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'dataset'").fetchone()
            if row is not None:
                if row[0] != key:
                    raise LedgerError(self._wrong_dataset(row[0], key))
                return
            other = self.conn.execute(
                "SELECT dataset FROM entries WHERE dataset != ? LIMIT 1", (key,)
            ).fetchone()
            if other is not None:
                raise LedgerError(
                    f"{self.path}: ledger already holds entries of data set {other[0]}; it "
                    f"cannot be bound to data set {key}. The ledger was not modified."
                )
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('dataset', ?)", (key,))

    def _intact_entries(self, key: str) -> list[LedgerEntry]:
        entries, problems = self._snapshot()
        if problems:
            raise LedgerError(
                f"{self.path}: the privacy ledger failed its integrity check: {problems[0]}. "
                "No spend is computed from a tampered ledger; restore it from a backup "
                "(`fedslm ledger verify` shows the details)."
            )
        return [e for e in entries if e.dataset == key]

    def _same_or_raise(
        self,
        e: LedgerEntry,
        segment: Segment,
        delta: float,
        accountant: str,
        epsilon: float | None,
    ) -> LedgerEntry:
        same = (e.q, e.sigma, e.steps, e.delta, e.accountant) == (
            segment.q,
            segment.sigma,
            segment.steps,
            delta,
            accountant,
        )
        if same and (epsilon is None or _close(float(epsilon), e.epsilon, EPSILON_TOLERANCE)):
            return e
        raise LedgerError(
            f"{self.path}: job {e.job_id!r} round {e.round} is already recorded (seq {e.seq}: "
            f"q={e.q}, sigma={e.sigma}, steps={e.steps}, delta={e.delta:g}, {e.accountant}, "
            f"epsilon {e.epsilon:.6g}) with different values (q={segment.q}, "
            f"sigma={segment.sigma}, steps={segment.steps}, delta={delta:g}, {accountant}"
            + ("" if epsilon is None else f", epsilon {epsilon:.6g}")
            + "); a round is recorded once. Nothing was written."
        )

    def _append(
        self,
        key: str,
        job_id: str,
        round: int,
        segment: Segment,
        delta: float,
        accountant: str,
        eps: float,
        eps_pld: float,
        t: float,
        last_ds_seq: int | None,
    ) -> LedgerEntry | None:
        """Write one entry if the data set is as the snapshot saw it; None means retry."""
        conn = self.conn
        with self._translate("recording an entry"), self._write():
            row = conn.execute("SELECT MAX(seq) FROM entries WHERE dataset = ?", (key,)).fetchone()
            if row[0] != last_ds_seq:
                return None  # someone appended to this data set meanwhile: recompute
            last = conn.execute(
                "SELECT seq, hash, time FROM entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            if last is not None and t < last[2]:
                raise LedgerError(
                    f"{self.path}: the clock went backwards: now is "
                    f"{format_time(t)} but the last entry (seq {last[0]}) was recorded at "
                    f"{format_time(last[2])}. Fix the system clock (NTP) and retry; nothing was "
                    "written."
                )
            seq = 1 if last is None else int(last[0]) + 1
            prev = GENESIS_HASH if last is None else str(last[1])
            body: dict[str, Any] = {
                "seq": seq,
                "dataset": key,
                "job_id": job_id,
                "round": round,
                "q": float(segment.q),
                "sigma": float(segment.sigma),
                "steps": int(segment.steps),
                "delta": delta,
                "accountant": accountant,
                "epsilon": float(eps),
                "epsilon_pld": float(eps_pld),
                "time": t,
                "prev_hash": prev,
            }
            entry = LedgerEntry(**body, hash=entry_hash(body))
            values = tuple(getattr(entry, f.name) for f in fields(LedgerEntry))
            conn.execute(
                f"INSERT INTO entries ({', '.join(_ENTRY_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_ENTRY_COLUMNS))})",
                values,
            )
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("head_seq", str(seq)), ("head_hash", entry.hash)],
            )
        return entry


def _create_file(path: Path) -> None:
    """Create an empty ledger at ``path`` atomically: built aside, then linked into place.

    A process killed while creating leaves at most a stray temporary file, never a
    half-initialised ledger that the next open would have to guess about.
    """
    if not path.parent.is_dir():
        raise LedgerError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file header
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")),
                ],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()  # checkpoints and removes the -wal file
        # link, not rename: it fails if another process created the ledger meanwhile, and
        # then theirs is the one to use
        with suppress(FileExistsError):
            os.link(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (sqlite3.Error, OSError) as exc:
        raise LedgerError(f"{path}: cannot create the privacy ledger: {exc}") from None
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def format_time(t: float) -> str:
    """A ledger timestamp as ISO 8601 UTC (or its repr if it is not a valid time)."""
    try:
        return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return repr(t)
