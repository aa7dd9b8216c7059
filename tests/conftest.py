"""Shared fixtures (tiny models built offline into a per-session cache, ledgers, paths) and
the test tiers: unit, integration, deployment (docs/testing.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("integration", "deployment")  # and "unit", for every test marked neither


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to one tier: unmarked tests are unit tests (``make test-fast``)."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session", autouse=True)
def fedslm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep built tiny models out of the user's cache (inherited by subprocesses too)."""
    home = Path(os.environ.get("FEDSLM_TEST_HOME") or tmp_path_factory.mktemp("fedslm-home"))
    os.environ["FEDSLM_HOME"] = str(home)
    return home


@pytest.fixture(scope="module", autouse=True)
def module_ledgers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Simulated sites' ledgers (one per data set, composing across runs) go to a folder of
    the module's own, so that runs in different modules never share a privacy budget; the
    folder is set before any module-scoped fixture runs a job."""
    folder = tmp_path_factory.mktemp("ledgers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSLM_LEDGERS", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def ledgers(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each test's own folder of simulated ledgers (inherited by subprocesses): runs in one
    test compose, as they would for a user; runs in different tests do not."""
    folder = tmp_path_factory.mktemp("ledgers")
    monkeypatch.setenv("FEDSLM_LEDGERS", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert(fedslm_home: Path) -> Path:
    """Folder of the tiny BERT (random weights, WordPiece tokenizer trained here)."""
    from fedslm.models.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-bert", fedslm_home / "models")


@pytest.fixture(scope="session")
def tiny_llama(fedslm_home: Path) -> Path:
    """Folder of the tiny Llama (random weights, byte-level BPE tokenizer trained here)."""
    from fedslm.models.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-llama", fedslm_home / "models")


@pytest.fixture(scope="session")
def documented_loader():
    """``load_fedslm_classifier`` as docs/models.md gives it to a stranger, executed from the
    Markdown itself: a change to the documented code is a change to what the tests check."""
    import re

    doc = ROOT / "docs" / "models.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    code = next(b for b in blocks if "def load_fedslm_classifier" in b)
    namespace: dict[str, object] = {"__name__": "stranger"}
    exec(compile(code, f"{doc}:load_fedslm_classifier", "exec"), namespace)
    return namespace["load_fedslm_classifier"]
