#!/usr/bin/env python3
"""The long crash-consistency run: ``python tests/crash/run.py --kills 200``.

SIGKILL rounds (``--kills``, split between examples/file.lua and the parallel file plugin)
and SIGTERM rounds (``--terms``, split the same way), each checked as crash_harness.py says.
Prints one line of figures per plugin and signal; exit status 1 if anything was lost, torn or
stray.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crash_harness


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILL rounds in all")
    parser.add_argument("--terms", type=int, default=40, help="SIGTERM rounds in all")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    crash_harness.main_env()
    plugins = list(crash_harness.PLUGINS)
    bad = 0
    for sig, total in ((signal.SIGKILL, args.kills), (signal.SIGTERM, args.terms)):
        for i, plugin in enumerate(plugins):
            rounds = total // len(plugins) + (i < total % len(plugins))
            if not rounds:
                continue
            start = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="lnbd-crash-") as tmp:
                totals = crash_harness.run(Path(tmp), plugin, sig, rounds, args.seed + i)
            what = f"{signal.Signals(sig).name} {plugin}"
            print(f"{totals.line(what)} ({time.monotonic() - start:.0f} s)", flush=True)
            for failure in totals.failures[:20]:
                print(f"  {failure}", flush=True)
            bad += len(totals.failures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
