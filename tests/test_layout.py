"""Architecture rules that keep the codebase honest."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedslm

LIBRARY = Path(fedslm.__file__).parent
ROOT = LIBRARY.parent
# The simulation launcher runs the ServerApp and every site's ClientApp in one process: it is
# the one module of the coordinator's package that may reach the site package.
HOSTS_BOTH_SIDES = {"simulation.py"}


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
    import fedslm.wire.codec

    assert Path(fedslm.clients.app.__file__).parent.name == "clients"
    assert Path(fedslm.server.app.__file__).parent.name == "server"
    assert Path(fedslm.wire.codec.__file__).parent.name == "wire"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _reaching(folder: str, packages: tuple[str, ...], allowed: set[str] = frozenset()) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / folder).glob("*.py")
        if path.name not in allowed
        for name in _imports(path)
        if name in packages or name.startswith(tuple(p + "." for p in packages))
    )


def test_server_does_not_import_the_site_package() -> None:
    """The coordinator's package decodes replies with the shared codec (``fedslm.wire``), not
    with anything of the site package; the shared codec imports neither side."""
    assert _reaching("server", ("fedslm.clients",), HOSTS_BOTH_SIDES) == []
    assert _reaching("wire", ("fedslm.clients", "fedslm.server")) == []
    code = (
        "import sys\n"
        "import fedslm.server.app, fedslm.server.strategy, fedslm.wire.codec\n"
        "bad = sorted(k for k in sys.modules if k.startswith('fedslm.clients'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_site_side_does_not_import_the_coordinator() -> None:
    """A site takes its message types from ``fedslm.messages``: neither the site nor its
    message handlers load the coordinator or the coordinator's package."""
    assert _reaching("clients", ("fedslm.server", "fedslm.coordinator")) == []
    code = (
        "import sys\n"
        "import fedslm.site, fedslm.clients.handlers, fedslm.clients.worker\n"
        "bad = sorted(k for k in sys.modules\n"
        "             if k == 'fedslm.coordinator' or k.startswith('fedslm.server'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
