#!/usr/bin/env python3
"""The long soak run: ``python tests/soak/run.py --seconds 600`` (soak.py says what runs)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lnbd-soak-") as tmp:
        figures = soak.Soak(Path(tmp), args.seconds).run()
    for line in figures.lines():
        print(line)
    for failure in figures.failures[:20]:
        print(f"  FAILED: {failure}")
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
