"""The dependency rule of the packages (README "Layout"): ``protocol`` <- ``backend`` <- ``lua``;
``server`` uses ``protocol`` and ``backend``, never ``lua``.  An AST scan of every import
statement, those inside functions included, and of ``__import__``/``import_module`` calls
that name a module; the last tests run the same rules over a synthetic tree with a violation
of each kind, so that a rule that stops seeing anything fails here rather than passes."""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import luanbd

ROOT = Path(luanbd.__file__).parent


def _imports(path: Path, package: str | None = None,
             root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module an import statement names, relative imports resolved (from ``package``,
    by default the file's own under ``root``)."""
    if package is None:
        package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
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
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            # __import__("luanbd.lua") / importlib.import_module("lupa")
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if name in ("__import__", "import_module") and node.args and isinstance(
                    node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _files(package: str, root: Path = ROOT) -> list[Path]:
    # rglob: a subpackage must not escape the rule of the package it is in.
    return sorted((root / package).rglob("*.py"))


def _bad(path: Path, forbidden: tuple[str, ...], package: str | None = None,
         root: Path = ROOT) -> list[tuple[int, str]]:
    return [(line, m) for line, m in _imports(path, package, root)
            if any(_within(m, f) for f in forbidden)]


SERVER_FORBIDDEN = ("luanbd.lua", "luanbd.filters", "lupa")
#: Filters are backend layers: the server runs them, the Lua binding never sees them.
FILTERS_FORBIDDEN = ("luanbd.server", "luanbd.lua", "lupa")
BACKEND_FORBIDDEN = ("luanbd.server", "luanbd.lua", "lupa")


def _not_stdlib(path: Path, package: str | None = None,
                root: Path = ROOT) -> list[tuple[int, str]]:
    return [(line, m) for line, m in _imports(path, package, root)
            if not _within(m, "luanbd.protocol") and m != "luanbd"
            and m.split(".")[0] not in sys.stdlib_module_names | {"__future__"}]


#: Each package's rule: the (line, module) pairs of one file that break it.
RULES: dict[str, Callable[[Path, Path], list[tuple[int, str]]]] = {
    "server": lambda path, root: _bad(path, SERVER_FORBIDDEN, root=root),
    "backend": lambda path, root: _bad(path, BACKEND_FORBIDDEN, root=root),
    "protocol": lambda path, root: _not_stdlib(path, root=root),
    "filters": lambda path, root: _bad(path, FILTERS_FORBIDDEN, root=root),
}


@pytest.mark.parametrize("path", _files("server"), ids=[p.name for p in _files("server")])
def test_server_never_imports_lua(path: Path) -> None:
    assert not RULES["server"](path, ROOT), f"server/{path.name} imports Lua"


@pytest.mark.parametrize("path", _files("backend"), ids=[p.name for p in _files("backend")])
def test_backend_imports_neither_server_nor_lua(path: Path) -> None:
    bad = RULES["backend"](path, ROOT)
    assert not bad, f"backend/{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("filters"), ids=[p.name for p in _files("filters")])
def test_filters_import_neither_server_nor_lua(path: Path) -> None:
    bad = RULES["filters"](path, ROOT)
    assert not bad, f"filters/{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("protocol"), ids=[p.name for p in _files("protocol")])
def test_protocol_imports_only_the_standard_library(path: Path) -> None:
    bad = RULES["protocol"](path, ROOT)
    assert not bad, f"protocol/{path.name} imports {bad}"


def test_the_rules_see_the_files() -> None:
    """An empty parameter list would skip the tests above instead of failing them."""
    names = {package: {p.name for p in _files(package)} for package in RULES}
    assert {"connection.py", "lifecycle.py"} <= names["server"]
    assert {"chain.py", "interface.py"} <= names["backend"]
    assert {"handshake.py", "transmission.py"} <= names["protocol"]
    assert {"__init__.py", "offset.py"} <= names["filters"]


def test_the_scan_catches_each_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import lupa\nfrom ..lua import plugin\nfrom luanbd import lua\n"
                      "def f():\n    import luanbd.lua.pinning\n")
    assert [m for _, m in _bad(sample, ("luanbd.lua", "lupa"), "luanbd.server")] == [
        "lupa", "luanbd.lua", "luanbd.lua.plugin", "luanbd.lua", "luanbd.lua.pinning"]


#: One file per kind of violation, in a tree laid out like src/luanbd: name -> (source,
#: the modules the package's rule must report).
_VIOLATIONS: dict[str, tuple[str, list[str]]] = {
    "server/absolute.py": ("import luanbd.lua.plugin\n", ["luanbd.lua.plugin"]),
    "server/as_name.py": ("import luanbd.lua as lua_package\n", ["luanbd.lua"]),
    "server/from_package.py": ("from luanbd import lua\n", ["luanbd.lua"]),
    "server/relative.py": ("from ..lua.plugin import LuaPlugin\n",
                           ["luanbd.lua.plugin", "luanbd.lua.plugin.LuaPlugin"]),
    "server/relative_name.py": ("from .. import lua\n", ["luanbd.lua"]),
    "server/lupa.py": ("from lupa import LuaRuntime\n", ["lupa", "lupa.LuaRuntime"]),
    "server/in_function.py": ("def start():\n    import luanbd.lua.pinning\n",
                              ["luanbd.lua.pinning"]),
    "server/in_method.py": ("class Start:\n    def run(self):\n"
                            "        from luanbd.lua import plugin\n",
                            ["luanbd.lua", "luanbd.lua.plugin"]),
    "server/dynamic.py": ("import importlib\nimportlib.import_module('luanbd.lua')\n",
                          ["luanbd.lua"]),
    "server/sub/__init__.py": ("from ...lua import runtime\n",
                               ["luanbd.lua", "luanbd.lua.runtime"]),
    "backend/server.py": ("from luanbd.server import connection\n",
                          ["luanbd.server", "luanbd.server.connection"]),
    "backend/relative.py": ("from ..server.requests import RequestHandler\n",
                            ["luanbd.server.requests", "luanbd.server.requests.RequestHandler"]),
    "backend/lua.py": ("def load():\n    import luanbd.lua\n", ["luanbd.lua"]),
    "protocol/third_party.py": ("import lupa\n", ["lupa"]),
    "protocol/backend.py": ("from ..backend import interface\n",
                            ["luanbd.backend", "luanbd.backend.interface"]),
    "protocol/from_package.py": ("from luanbd import server\n", ["luanbd.server"]),
    "protocol/in_function.py": ("def f():\n    import luanbd.lua\n", ["luanbd.lua"]),
    "protocol/dynamic.py": ("__import__('lupa')\n", ["lupa"]),
}

#: Files that keep the rules: each must be reported clean.
_CLEAN = {
    "server/ok.py": "import socket\nfrom luanbd.protocol import handshake\n"
                    "from ..backend import chain\nfrom . import lua_names\n",
    "backend/ok.py": "import threading\nfrom luanbd.protocol.constants import Cmd\n"
                     "from . import locks\n",
    "protocol/ok.py": "from __future__ import annotations\nimport struct\n"
                      "from luanbd.protocol.constants import Opt\nfrom . import errors\n"
                      "from .options import option_reply\nimport luanbd\n",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "luanbd"
    for name, source in [*((n, s) for n, (s, _) in _VIOLATIONS.items()), *_CLEAN.items()]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def test_each_rule_reports_each_violation(tree: Path) -> None:
    found = {str(path.relative_to(tree)): [m for _, m in rule(path, tree)]
             for package, rule in RULES.items() for path in _files(package, tree)}
    assert found == {**{name: modules for name, (_, modules) in _VIOLATIONS.items()},
                     **{name: [] for name in _CLEAN}}
