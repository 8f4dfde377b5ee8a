"""The dependency rule of the packages (README "Layout"): ``protocol`` <- ``backend`` <- ``lua``;
``server`` uses ``protocol`` and ``backend``, never ``lua``.  An AST scan of every import
statement, those inside functions included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import luanbd

ROOT = Path(luanbd.__file__).parent


def _imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """Every module an import statement names, relative imports resolved (from ``package``,
    by default the file's own)."""
    if package is None:
        package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
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
            # "from luanbd import lua" names luanbd.lua
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def _bad(path: Path, forbidden: tuple[str, ...],
         package: str | None = None) -> list[tuple[int, str]]:
    return [(line, m) for line, m in _imports(path, package)
            if any(_within(m, f) for f in forbidden)]


#: The other half of issue 12 moves Lua start-up out of server/lifecycle.py.
_LIFECYCLE = pytest.mark.xfail(reason="server/lifecycle.py still builds the LuaPlugin "
                                      "(issue 12: start-up moves out of server/)", strict=False)


@pytest.mark.parametrize("path", [pytest.param(p, marks=_LIFECYCLE) if p.name == "lifecycle.py"
                                  else p for p in _files("server")],
                         ids=[p.name for p in _files("server")])
def test_server_never_imports_lua(path: Path) -> None:
    assert not _bad(path, ("luanbd.lua", "lupa")), f"server/{path.name} imports Lua"


@pytest.mark.parametrize("path", _files("backend"), ids=[p.name for p in _files("backend")])
def test_backend_imports_neither_server_nor_lua(path: Path) -> None:
    bad = _bad(path, ("luanbd.server", "luanbd.lua", "lupa"))
    assert not bad, f"backend/{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("protocol"), ids=[p.name for p in _files("protocol")])
def test_protocol_imports_only_the_standard_library(path: Path) -> None:
    bad = [(line, m) for line, m in _imports(path)
           if not _within(m, "luanbd.protocol") and m != "luanbd"
           and m.split(".")[0] not in sys.stdlib_module_names | {"__future__"}]
    assert not bad, f"protocol/{path.name} imports {bad}"


def test_the_scan_catches_each_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import lupa\nfrom ..lua import plugin\nfrom luanbd import lua\n"
                      "def f():\n    import luanbd.lua.pinning\n")
    assert [m for _, m in _bad(sample, ("luanbd.lua", "lupa"), "luanbd.server")] == [
        "lupa", "luanbd.lua", "luanbd.lua.plugin", "luanbd.lua", "luanbd.lua.pinning"]
