"""A run folder's marker, and the rules for replacing a run with ``--overwrite``.

``fedslm simulate`` and ``fedslm centralized`` write ``fedslm-run.json`` into their output
folder before anything else. ``--overwrite`` deletes a folder only when that marker says it is
a fedslm run, only after the new job has been validated, never when the folder holds the job's
own inputs, and never when it holds a privacy ledger (an SQLite file): deleting a ledger resets
the privacy budget of a data set, which no flag on a training command should be able to do.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedslm import __version__
from fedslm.artifacts import write_json
from fedslm.errors import ConfigError
from fedslm.privacy.ledger import is_sqlite_file

MARKER = "fedslm-run.json"


def write_marker(
    out: Path, command: str, source: str, ledgers: Mapping[str, Path] | None = None
) -> Path:
    """Mark ``out`` as a fedslm run (made by ``command`` from config ``source``) and record
    where each site's ledger is, for readers of a run without a ``job.json``."""
    path = Path(out) / MARKER
    data: dict[str, Any] = {
        "fedslm_run": 1,
        "fedslm_version": __version__,
        "command": command,
        "config": source,
        "ledgers": {name: str(p) for name, p in (ledgers or {}).items()},
    }
    write_json(path, data)
    return path


def record_ledgers(out: Path, ledgers: Mapping[str, Path]) -> None:
    """Add where each site's ledger is to the marker of run ``out`` (written before the sites
    were set up: the centralized baseline's pooled data set exists only once it runs)."""
    data = read_marker(out)
    if data is None:
        return
    data["ledgers"] = dict(data.get("ledgers") or {}) | {n: str(p) for n, p in ledgers.items()}
    write_json(Path(out) / MARKER, data)


def read_marker(out: Path) -> dict[str, Any] | None:
    """The marker of run folder ``out``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(out) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("fedslm_run") == 1 else None


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (or is it), symlinks resolved on both sides."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_output_folder(out: Path, inputs: Iterable[Path], overwrite: bool) -> bool:
    """Check that ``out`` may receive a new run; return whether an old run must be deleted
    first. Reads only: call it, then validate the job, then ``clear_run``.

    Raises ``ConfigError`` (one message naming the folder and what to do) when ``out`` is a
    file, holds one of the job's ``inputs`` (config, data, model, ledger), already holds
    something and ``overwrite`` is off, is not a fedslm run, or holds a privacy ledger.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; choose another --out")
    for p in inputs:
        if is_inside(Path(p), out):
            raise ConfigError(
                f"--out {out}: holds this job's input {p}; a run folder is replaced as a "
                "whole, so choose an --out that holds none of the job's files"
            )
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise ConfigError(
            f"--out {out}: already holds files; choose another --out or pass --overwrite"
        )
    if read_marker(out) is None:
        raise ConfigError(
            f"--out {out}: is not a fedslm run (no {MARKER}), so --overwrite will not delete it; "
            "choose another --out, or empty the folder yourself"
        )
    for p in sorted(out.rglob("*")):
        if p.is_file() and not p.is_symlink() and is_sqlite_file(p):
            raise ConfigError(
                f"--out {out}: holds {p}, an SQLite file (a privacy ledger records the spend on "
                "a data set), and --overwrite never deletes a ledger; move it out of the run "
                "folder (simulated sites now keep theirs in the ledger folder, see "
                "$FEDSLM_LEDGERS) or choose another --out"
            )
    return True


def clear_run(out: Path) -> None:
    """Delete run folder ``out``; only after ``check_output_folder`` said it may be replaced."""
    if read_marker(out) is None:  # checked again: never delete a folder that is not a run
        raise ConfigError(f"--out {out}: is not a fedslm run (no {MARKER}); not deleted")
    shutil.rmtree(out)
