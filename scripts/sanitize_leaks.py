#!/usr/bin/env python3
"""Read the LeakSanitizer reports of scripts/sanitize.sh's leak runs (REPORTS/leak.PID) and
fail on any leak whose allocation stack passes through luanbd's extensions (_fastpath,
_lualib), or on any other sanitizer error in those runs.

CPython does not free everything at exit by design, so the interpreter's own leaks (stacks
through python3 and lupa only) are counted and listed by size, not failed on.

Usage: sanitize_leaks.py REPORTS_DIR
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

OURS = ("_fastpath", "_lualib")
BLOCK = re.compile(r"^(Direct|Indirect) leak of (\d+) byte\(s\) in (\d+) object\(s\)", re.M)


def main() -> int:
    reports = sorted(Path(sys.argv[1]).glob("leak.*"))
    ours: list[str] = []
    others = others_bytes = errors = 0
    for path in reports:
        text = path.read_text(errors="replace")
        if re.search(r"ERROR: (AddressSanitizer|UndefinedBehaviorSanitizer)|runtime error:",
                     text):
            errors += 1
            print(f"--- {path}: a sanitizer error\n{text}")
        if "LeakSanitizer has encountered a fatal error" in text:
            errors += 1
            print(f"--- {path}: LeakSanitizer could not run\n{text[:2000]}")
        starts = [m.start() for m in BLOCK.finditer(text)] + [len(text)]
        for begin, stop in itertools.pairwise(starts):
            block = text[begin:stop].split("\n\n")[0]
            if any(name in block for name in OURS):
                ours.append(f"{path.name}: {block}")
            else:
                others += 1
                others_bytes += int(BLOCK.match(block).group(2))  # type: ignore[union-attr]
    print(f"leaks: {len(reports)} report file(s); {len(ours)} leak(s) through "
          f"{'/'.join(OURS)}; {others} of the interpreter's own ({others_bytes} bytes, "
          f"not counted); {errors} other error(s)")
    for block in ours:
        print(block)
    return 1 if ours or errors else 0


if __name__ == "__main__":
    sys.exit(main())
