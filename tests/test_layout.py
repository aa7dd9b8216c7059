"""Architecture rules that keep the codebase honest."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedslm

LIBRARY = Path(fedslm.__file__).parent


@pytest.mark.integration
def test_library_runs_without_flower() -> None:
    """Nothing in fedslm/ (the library) imports Flower; only clients/ and server/ do."""
    modules = [
        m.name
        for m in pkgutil.walk_packages([str(LIBRARY)], "fedslm.")
        if not m.name.startswith(("fedslm.clients", "fedslm.server"))
    ]
    assert "fedslm.coordinator" in modules and "fedslm.site" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k == 'flwr' or k.startswith('flwr.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adapters_install_under_the_fedslm_namespace() -> None:
    import fedslm.clients.app
    import fedslm.server.app

    assert Path(fedslm.clients.app.__file__).parent.name == "clients"
    assert Path(fedslm.server.app.__file__).parent.name == "server"
