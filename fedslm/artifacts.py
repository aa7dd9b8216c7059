"""Writing run outputs so that a crash never leaves a half-written file behind.

JSON files are written to a temporary file and renamed; JSON Lines are appended one whole line
at a time and flushed to disk.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; null keeps the file readable by every parser
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` through ``write`` on a temporary file, fsynced, then renamed into place:
    a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def write_torch(path: Path, data: Any) -> None:
    """``torch.save`` ``data`` to ``path`` atomically (tensors, numbers, dicts only)."""
    import torch

    write_atomic(path, lambda fh: torch.save(data, fh))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as one line, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = jsonl_line(record)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSON Lines line (``append_jsonl``'s), for rewriting such a file whole."""
    return json.dumps(_clean(record), sort_keys=True) + "\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON Lines file."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the privacy figures depend on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fedslm", "torch", "transformers", "peft", "opacus", "dp-accounting", "flwr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
