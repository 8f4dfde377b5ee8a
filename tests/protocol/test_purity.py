"""luanbd.protocol is sans-IO: it imports no sockets, TLS, threads, event loops or Lua, and
nothing from the layers built on top of it (an AST scan, so lazy imports count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import luanbd.protocol

PACKAGE_DIR = Path(luanbd.protocol.__file__).parent
FILES = sorted(PACKAGE_DIR.glob("*.py"))

FORBIDDEN = ("socket", "ssl", "threading", "selectors", "lupa",
             "luanbd.server", "luanbd.lua", "luanbd.backend")


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module named by an import statement, relative imports resolved."""
    package = "luanbd.protocol"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # "from luanbd import server" names luanbd.server
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            # __import__("socket") / importlib.import_module("socket")
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if name in ("__import__", "import_module") and node.args and isinstance(
                    node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


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
