"""Canaries for the one-run privacy audit: random records, their inclusion bits, and the rule
that keeps them out of real jobs.

A canary is a record no real data set holds: random tokens of the base model's own vocabulary,
with a uniformly random label (classification) or as the response to a random-token prompt
(causal LM). Each of ``m`` canaries is included in one site's training data independently
with probability 1/2; the bits are drawn from the audit's own seed and written only to the
audit's ``canaries.json``.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from fedslm.config import JobConfig
from fedslm.data import SitePlan
from fedslm.errors import ConfigError
from fedslm.runfolder import is_inside

WORDS_PER_TEXT = (8, 16)  # classification text; causal-LM response
PROMPT_WORDS = 4


@dataclass(frozen=True)
class Canaries:
    """``m`` random records (each a row in the task's columns) and which are included."""

    rows: list[dict[str, str]]
    included: list[bool]
    seed: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def members(self) -> list[dict[str, str]]:
        """The canaries the audited site trains on."""
        return [row for row, bit in zip(self.rows, self.included, strict=True) if bit]


def word_pool(tokenizer) -> list[str]:
    """Whole alphabetic words of the tokenizer's vocabulary (at least 3 letters, no special
    tokens, no word pieces), each decoded from one token id, sorted: what canaries are made
    of. Works for WordPiece and byte-level BPE alike."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words = set()
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        word = text.strip()
        if len(word) >= 3 and word.isascii() and word.isalpha() and "#" not in text:
            words.add(word.lower())
    if len(words) < 50:
        raise ConfigError(
            f"the base model's tokenizer has only {len(words)} whole-word tokens; the audit "
            "needs at least 50 to make random canaries"
        )
    return sorted(words)


def make_canaries(
    job: JobConfig, words: list[str], labels: list[str], m: int, seed: int
) -> Canaries:
    """``m`` canaries in ``job``'s columns, each included with probability 1/2 (seeded)."""
    if m < 2:
        raise ConfigError(f"--canaries {m}: the audit needs at least 2 canaries")
    rng = random.Random(f"fedslm-audit/{seed}")
    d = job.data

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    rows = []
    for _ in range(m):
        if job.task.type == "classification":
            rows.append({d.text_column: text(*WORDS_PER_TEXT), d.label_column: rng.choice(labels)})
        else:
            rows.append(
                {
                    d.prompt_column: text(PROMPT_WORDS, PROMPT_WORDS),
                    d.response_column: text(*WORDS_PER_TEXT),
                }
            )
    included = [rng.random() < 0.5 for _ in range(m)]
    return Canaries(rows, included, seed)


def with_canaries(site: SitePlan, canaries: Canaries, job: JobConfig) -> SitePlan:
    """``site`` with the included canaries added to its training rows (never to its
    evaluation rows). Poisson sampling ignores order, so they are appended."""
    members = canaries.members
    labels = site.train_labels
    if labels is not None:
        labels = [*labels, *(row[job.data.label_column] for row in members)]
    return replace(site, train=[*site.train, *members], train_labels=labels)


def data_refusal(job: JobConfig, config: Path) -> str | None:
    """Why ``job``'s data looks like a real site's data set (None: the audit may use it).

    Canaries must never reach a production job, and an audit trains on the data it is given.
    The rule: synthetic data is always fine; a data file (``data.path``, ``data.sites``) is
    fine when it lies, symlinks resolved, inside the config file's own folder or the system's
    temporary folder, i.e. next to an experiment's config; any other location is treated as a
    real data set. ``data.at_sites`` (deployment: each site reads its own file) is always
    refused by the caller: there is nothing here to simulate.
    """
    d = job.data
    files = [Path(d.path)] if d.path else []
    files += [Path(p) for p in (d.sites or {}).values()]
    allowed = [Path(config).resolve().parent, Path(tempfile.gettempdir()).resolve()]
    outside = [f for f in files if not any(is_inside(f, a) for a in allowed)]
    if not outside:
        return None
    return (
        f"{config}: data file(s) {', '.join(str(f) for f in outside)} lie outside the config's "
        f"folder ({allowed[0]}) and the temporary folder ({allowed[1]}), so they are treated as "
        "a real site's data set; canaries never go into real data. Copy a public or synthetic "
        "data set next to the config, or pass --allow-site-data if this is not a real data set"
    )
