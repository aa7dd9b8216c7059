"""Ledger heads kept outside the ledger, and the check that a ledger still extends them.

A ledger's hash chain catches an edited entry, but not a ledger rewritten from some entry on
with every later hash recomputed: that file is a valid chain of its own. What such a rewrite
cannot do is keep the heads the site released before it. Every head a site has released
(its training replies carry ``(ledger_seq, ledger_head)``; privacy.json, metrics.jsonl and the
site's signed report keep them) and every head it wrote (the journal beside the ledger) is an
*anchor*: the ledger must still hold that entry, with that hash, at that seq. Because each
entry's hash covers the one before it, a matching anchor vouches for the whole chain up to it.

What is anchored where (docs/architecture.md, "Anchored ledger heads"):

- the coordinator: every site's head per round, in metrics.jsonl and privacy.json of the run,
  and (deployed) the last one per site across runs in ``runs/ledger_anchors.json``;
- the site's released reports: privacy.json and ``sites/SITE/report.json`` of each run;
- the site's journal (``<ledger>.heads``, one line per entry written): the second line only,
  since whoever can rewrite the ledger can usually rewrite a file beside it.

``divergence`` is the pure check; ``read_anchors`` reads anchors from a run folder, a
privacy.json, a report.json or a journal; ``check_ledger_anchors`` puts them together for a
ledger file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedslm.privacy.ledger import LedgerError, PrivacyLedger, journal_path

PRIVACY_FILE = "privacy.json"
METRICS_FILE = "metrics.jsonl"
SITE_REPORT_FILE = "report.json"
# the coordinator's store of every site's last head, across the runs in its runs folder
COORDINATOR_ANCHORS_FILE = "ledger_anchors.json"


@dataclass(frozen=True)
class Anchor:
    """A head released or written earlier: entry ``seq`` had ``hash``. ``seq`` is None for a
    head recorded by hash alone (privacy.json of runs before heads carried their seq).
    ``source`` names where it was read, for the message."""

    seq: int | None
    hash: str
    source: str


@dataclass(frozen=True)
class Divergence:
    """Where a ledger stops extending its anchors.

    The chain agrees with every anchor up to seq ``agrees_until`` (0: none vouches for any
    entry); ``first`` is the earliest anchor it does not hold, and ``found`` the hash the
    ledger has at that seq (None: the ledger is shorter, or a hash-only anchor is nowhere in
    it). The first rewritten entry is between ``agrees_until + 1`` and ``first.seq``.
    """

    first: Anchor
    found: str | None
    agrees_until: int
    entries: int

    @property
    def from_seq(self) -> int:
        """The earliest seq that may have been rewritten."""
        return self.agrees_until + 1

    def describe(self) -> str:
        """One sentence naming the entry where the ledger and its anchors part."""
        a = self.first
        where = f"entry seq {a.seq}" if a.seq is not None else "the anchored entry"
        if a.seq is None:
            what = f"no entry of the ledger has hash {a.hash[:16]}…"
        elif self.found is None:
            what = f"the ledger has only {self.entries} entries"
        else:
            what = f"the ledger's entry seq {a.seq} has hash {self.found[:16]}…"
        if a.seq is not None and self.from_seq >= a.seq:
            at = f"it was rewritten from entry seq {a.seq} on"
        elif a.seq is not None:
            at = (
                f"it agrees with its anchors up to seq {self.agrees_until}, so it was rewritten "
                f"from an entry between seq {self.from_seq} and {a.seq}"
            )
        else:
            at = f"it agrees with its anchors up to seq {self.agrees_until}"
        return (
            f"the ledger does not extend the head anchored in {a.source} ({where}, hash "
            f"{a.hash[:16]}…): {what}; {at} (entries deleted, inserted or edited and the "
            "later hashes recomputed)"
        )


def divergence(entries: Sequence[Any], anchors: Iterable[Anchor]) -> Divergence | None:
    """Whether the chain ``entries`` (with ``seq`` and ``hash``, in order, already checked by
    ``chain_problems``) extends every anchor; the first place it does not, else None.

    An anchor with a seq is held when the entry at that seq has its hash; one without a seq
    when some entry has its hash (that entry then vouches for the chain up to it).
    """
    by_seq = {e.seq: e.hash for e in entries}
    by_hash = {e.hash: e.seq for e in entries}
    held: list[int] = []
    missed: list[tuple[int, Anchor, str | None]] = []
    for a in anchors:
        seq = a.seq if a.seq is not None else by_hash.get(a.hash)
        if seq is None:  # a hash-only anchor the ledger does not hold: place it last
            missed.append((len(entries) + 1, a, None))
        elif by_seq.get(seq) == a.hash:
            held.append(seq)
        else:
            missed.append((seq, a, by_seq.get(seq)))
    if not missed:
        return None
    seq, first, found = min(missed, key=lambda m: m[0])
    agrees = max((s for s in held if s < seq), default=0)
    return Divergence(first, found, agrees, len(entries))


# --------------------------------------------------------------------------------------------
# Reading anchors


def read_journal(path: Path) -> list[Anchor]:
    """The heads a ledger's journal recorded (empty if there is none). A line torn by a crash
    while it was appended is skipped; any other unreadable line is an error."""
    if not path.exists():
        return []
    anchors = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            anchors.append(Anchor(int(rec["seq"]), str(rec["hash"]), f"{path} line {n}"))
        except (ValueError, KeyError, TypeError) as exc:
            if n == len(lines):  # the last line, not terminated: a torn append
                continue
            raise LedgerError(
                f"{path} line {n}: not a ledger head ({exc}); the journal of ledger heads "
                "is written by fedslm only"
            ) from None
    return anchors


def read_anchors(path: str | Path, site: str | None = None) -> list[Anchor]:
    """The heads of ``site`` kept in ``path``: a run folder (its privacy.json and
    metrics.jsonl, or a site's folder of a report with report.json), a privacy.json, a
    report.json, a metrics.jsonl, or a journal (``<ledger>.heads``).

    ``site`` chooses among the sites of a run; it may be left out when only one site released
    a head there. Raises ``LedgerError`` naming the file for anything unreadable.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / n for n in (PRIVACY_FILE, METRICS_FILE, SITE_REPORT_FILE)]
        if site is not None:
            files.append(path / "sites" / site / SITE_REPORT_FILE)
        found = [f for f in files if f.exists()]
        if not found:
            raise LedgerError(
                f"{path}: no {PRIVACY_FILE}, {METRICS_FILE} or {SITE_REPORT_FILE} to read "
                "ledger heads from; pass a run folder, one of those files, or a journal"
            )
        return [a for f in found for a in read_anchors(f, site)]
    if not path.exists():
        raise LedgerError(f"{path}: no such file to read ledger heads from")
    if path.suffix != ".json" and path.name != METRICS_FILE:
        return read_journal(path)
    try:
        if path.name == METRICS_FILE:
            rounds = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
            return _metrics_anchors(path, rounds, site)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LedgerError(f"{path}: cannot read ledger heads: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("sites"), dict):
        return _privacy_anchors(path, data["sites"], site)
    if isinstance(data, dict) and data.get("format") == "fedslm-site-report":
        return _site_report_anchors(path, data, site)
    heads = _report_heads(data)
    return [Anchor(None, h, f"{path} ({s})") for s in _pick(path, heads, site) for h in heads[s]]


def _pick(path: Path, heads: dict[str, Any], site: str | None) -> list[str]:
    if site is not None:
        return [site] if site in heads else []
    if len(heads) > 1:
        raise LedgerError(
            f"{path}: holds ledger heads of sites {', '.join(sorted(heads))}; say which is "
            "this site's (--site NAME, or daemon.name in the policy)"
        )
    return list(heads)


def _privacy_anchors(path: Path, sites: dict[str, Any], site: str | None) -> list[Anchor]:
    heads = {s: p for s, p in sites.items() if isinstance(p, dict) and p.get("ledger_head")}
    out = []
    for s in _pick(path, heads, site):
        p = heads[s]
        seq = p.get("ledger_head_seq")
        out.append(
            Anchor(int(seq) if seq is not None else None, str(p["ledger_head"]), f"{path} ({s})")
        )
    return out


def _site_report_anchors(path: Path, data: dict[str, Any], site: str | None) -> list[Anchor]:
    """The head a deployed site's own report covers (``fedslm site report``)."""
    ledger = data.get("ledger")
    head = ledger if isinstance(ledger, dict) else {}
    name, digest, seq = data.get("site"), head.get("entries_hash"), head.get("entries_seq")
    if not isinstance(digest, str) or (site is not None and name != site):
        return []
    return [Anchor(int(seq) if isinstance(seq, int) else None, digest, f"{path} ({name})")]


def _metrics_anchors(path: Path, rounds: list[dict[str, Any]], site: str | None) -> list[Anchor]:
    heads: dict[str, list[Anchor]] = {}
    for rec in rounds:
        for s, r in (rec.get("sites") or {}).items():
            if isinstance(r, dict) and r.get("ledger_head"):
                seq = r.get("ledger_seq")
                where = f"{path} (round {rec.get('round')}, {s})"
                anchor = Anchor(int(seq) if seq is not None else None, r["ledger_head"], where)
                heads.setdefault(s, []).append(anchor)
    return [a for s in _pick(path, heads, site) for a in heads[s]]


def _report_heads(data: Any, found: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Per site, every ``ledger_head_in_privacy_json`` and ``ledger_last_hash`` of its part of
    a report (``privacy.sites[].lifetime``: a run's report holds every site's)."""
    found = {} if found is None else found
    if isinstance(data, dict):
        lifetime = data.get("lifetime")
        if isinstance(data.get("site"), str) and isinstance(lifetime, dict):
            for key in ("ledger_head_in_privacy_json", "ledger_last_hash"):
                if isinstance(lifetime.get(key), str):
                    found.setdefault(data["site"], []).append(lifetime[key])
        for v in data.values():
            _report_heads(v, found)
    elif isinstance(data, list):
        for v in data:
            _report_heads(v, found)
    return found


# --------------------------------------------------------------------------------------------
# A ledger file against its anchors


def check_ledger_anchors(
    ledger: PrivacyLedger, anchors: Sequence[Anchor] = (), *, journal: bool = True
) -> Divergence | None:
    """Where the (intact) chain of ``ledger`` stops extending ``anchors`` and, with
    ``journal``, the heads in its journal; None when it extends them all.

    Raises ``LedgerError`` if the chain itself is broken (``ledger verify`` shows it).
    """
    entries, problems = ledger._snapshot()
    if problems:
        raise LedgerError(f"{ledger.path}: the privacy ledger failed its integrity check: "
                          f"{problems[0]}")  # fmt: skip
    kept = [*anchors, *(read_journal(journal_path(ledger.path)) if journal else [])]
    return divergence(entries, kept)


def ledger_divergence(ledger_path: Path, anchors: Sequence[Anchor] = ()) -> Divergence | None:
    """``check_ledger_anchors`` for the ledger file at ``ledger_path``, journal included; a
    ledger that does not exist is an empty chain (deleting it does not forget its heads)."""
    if not ledger_path.exists():
        return divergence([], [*anchors, *read_journal(journal_path(ledger_path))])
    with PrivacyLedger(ledger_path, create=False) as ledger:
        return check_ledger_anchors(ledger, anchors)


def anchor_refusal(ledger_path: Path, anchors: Sequence[Anchor] = ()) -> str | None:
    """The reason a site refuses a job on the ledger at ``ledger_path`` (None: the ledger
    extends every anchor and every head in its journal)."""
    found = ledger_divergence(ledger_path, anchors)
    if found is None:
        return None
    return (
        f"privacy ledger {ledger_path}: {found.describe()}. No job is accepted on a ledger "
        "that lost spend it had released; restore the ledger from a backup that extends the "
        "anchored head"
    )
