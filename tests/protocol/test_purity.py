"""luanbd.protocol is sans-IO: it imports no sockets, TLS, threads, event loops or Lua, and
nothing from the layers built on top of it (an AST scan, so lazy imports count too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import luanbd.protocol
from protocol.test_layers import _imports as scan_imports

PACKAGE_DIR = Path(luanbd.protocol.__file__).parent
FILES = sorted(PACKAGE_DIR.glob("*.py"))

FORBIDDEN = ("socket", "ssl", "threading", "selectors", "lupa",
             "luanbd.server", "luanbd.lua", "luanbd.backend")


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import names (test_layers.py's scan), as seen from luanbd.protocol."""
    return scan_imports(path, "luanbd.protocol")


def test_the_scan_sees_the_files() -> None:
    names = {p.name for p in FILES}
    assert {"constants.py", "errors.py", "handshake.py", "transmission.py",
            "replies.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_no_io_imports(path: Path) -> None:
    bad = [(line, module) for line, module in _imports(path) if _is_forbidden(module)]
    assert not bad, f"{path.name} imports {bad}"


def test_scanner_catches_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import socket\nfrom ..server import connection\n"
                      "from luanbd import lua\ndef f():\n    import ssl\n"
                      "__import__('threading')\n")
    assert [m for _, m in _imports(sample) if _is_forbidden(m)] == [
        "socket", "luanbd.server", "luanbd.server.connection", "luanbd.lua", "ssl", "threading"]


def test_importing_the_package_loads_no_io_modules() -> None:
    code = ("import sys\n"
            "import luanbd.protocol.handshake, luanbd.protocol.transmission\n"
            "import luanbd.protocol.replies, luanbd.protocol.errors\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {('lupa', 'selectors')!r}"
            " or m.startswith(('luanbd.server', 'luanbd.lua', 'luanbd.backend'))]\n"
            "print(bad)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
