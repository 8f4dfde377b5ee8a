"""The size rules of the code (README "Layout"): no module over 500 lines, no class over
300, so that each keeps one concern a reader can hold at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import luanbd

ROOT = Path(luanbd.__file__).parent
MODULE_LINES = 500
CLASS_LINES = 300
SOURCES = sorted([*ROOT.rglob("*.py"), *ROOT.rglob("*.c"), *ROOT.rglob("*.lua")])


def test_the_sources_are_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"connection.py", "_fastpath.c", "nbdkit.lua", "handshake.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_module_size(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def _classes(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    return [(node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]


@pytest.mark.parametrize("path", [p for p in SOURCES if p.suffix == ".py"],
                         ids=[str(p.relative_to(ROOT)) for p in SOURCES if p.suffix == ".py"])
def test_class_size(path: Path) -> None:
    big = [(name, n) for name, n in _classes(path) if n > CLASS_LINES]
    assert not big, f"{path.relative_to(ROOT)}: {big}"


def test_the_class_rule_measures_whole_classes(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("class A:\n" + "    x = 1\n" * 301 + "class B:\n    pass\n")
    assert _classes(sample) == [("A", 302), ("B", 2)]
