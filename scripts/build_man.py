#!/usr/bin/env python3
"""Regenerate the man pages in man/ from the Markdown manuals in docs/, with pandoc.

    python3 scripts/build_man.py            # rewrite man/*.1, man/*.3
    python3 scripts/build_man.py --check    # exit 1 if a committed page is out of date

The pages are committed (pip installs them from man/, see pyproject.toml data-files), so
installing luanbd needs no pandoc; tests/integration/test_man.py runs --check.  The .TH
line carries the version from pyproject.toml and no date, so that the output depends on
the sources and the pandoc version only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILTER = ROOT / "scripts" / "man.lua"

#: docs/ source -> (page name, section, NAME line for a source that has no NAME section).
PAGES: dict[str, tuple[str, int, str | None]] = {
    "luanbd.md": ("luanbd", 1, None),
    "luanbd-filters.md": ("luanbd-filters", 1, None),
    "lua-plugins.md": ("luanbd-lua-plugin", 3,
                       "luanbd-lua-plugin - writing nbdkit-style Lua plugins for luanbd"),
    "lua-filters.md": ("luanbd-lua-filter", 3,
                       "luanbd-lua-filter - writing luanbd filters in Lua"),
}


def version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def render(source: str) -> str:
    """The roff text of the page made from docs/<source>."""
    name, section, name_line = PAGES[source]
    args = ["pandoc", "-s", "-f", "markdown", "-t", "man", f"--lua-filter={FILTER}",
            "-M", f"title={name.upper()}", "-M", f"section={section}",
            "-M", f"footer=luanbd {version()}", "-M", "header=luanbd manual",
            "-V", "hyphenate=",  # option names stay whole
            "-M", "man-refs=" + " ".join(f"{src}={ref}({sec})"
                                         for src, (ref, sec, _) in PAGES.items())]
    if name_line:
        args += ["-M", f"man-name={name_line}"]
    try:
        result = subprocess.run([*args, str(ROOT / "docs" / source)], capture_output=True,
                                text=True, check=False)
    except FileNotFoundError:
        raise SystemExit("build_man: pandoc not found (Debian: apt-get install pandoc)") from None
    if result.returncode != 0:
        raise SystemExit(f"build_man: pandoc failed on docs/{source}:\n{result.stderr}")
    return result.stdout


def page_path(out: Path, source: str) -> Path:
    name, section, _ = PAGES[source]
    return out / f"{name}.{section}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed pages instead of writing them")
    parser.add_argument("--output", type=Path, default=ROOT / "man",
                        help="where the pages go (default: man/)")
    opts = parser.parse_args()
    stale = []
    for source in PAGES:
        text = render(source)
        path = page_path(opts.output, source)
        if opts.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"build_man: out of date: {', '.join(stale)}; run python3 scripts/build_man.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
