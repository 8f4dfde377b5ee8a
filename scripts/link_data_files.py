#!/usr/bin/env python3
"""Link the data files of pyproject.toml (man pages, bash completion) into a virtualenv.

    python3 scripts/link_data_files.py .venv

``pip install -e`` (PEP 660) installs the package but not setuptools' data-files, so an
editable venv would have no ``man luanbd``; scripts/setup.sh runs this after it.  The links
point into the checkout, so regenerated pages (scripts/build_man.py) are seen at once.  A
plain ``pip install .`` copies the same files itself.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_files() -> dict[str, list[str]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        table: dict[str, list[str]] = tomllib.load(f)["tool"]["setuptools"]["data-files"]
    return table


def link(prefix: Path) -> list[Path]:
    made = []
    for directory, files in data_files().items():
        target_dir = prefix / directory
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            source = ROOT / name
            if not source.is_file():
                raise SystemExit(f"link_data_files: {name}: no such file")
            target = target_dir / source.name
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(source)
            made.append(target)
    return made


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: link_data_files.py PREFIX (a virtualenv)", file=sys.stderr)
        return 1
    try:
        link(Path(sys.argv[1]).absolute())
    except OSError as err:
        print(f"link_data_files: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
