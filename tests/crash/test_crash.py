"""Crash consistency, the short version of ``python tests/crash/run.py --kills 200``.

examples/file.lua and the parallel file plugin, each killed with SIGKILL at random moments
while four clients write (FUA writes and FLUSHes among them), then SIGTERM rounds: after each
restart every durable write reads back, no sector is torn or stray (crash_harness.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

import crash_harness
import pytest

SIGKILL_ROUNDS = 10
SIGTERM_ROUNDS = 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plugin", list(crash_harness.PLUGINS))
@pytest.mark.parametrize(("sig", "rounds"), [(signal.SIGKILL, SIGKILL_ROUNDS),
                                             (signal.SIGTERM, SIGTERM_ROUNDS)],
                         ids=["SIGKILL", "SIGTERM"])
def test_acknowledged_writes_survive(tmp_path: Path, plugin: str, sig: int,
                                     rounds: int) -> None:
    totals = crash_harness.run(tmp_path, plugin, sig, rounds, seed=rounds)
    print(totals.line(f"{signal.Signals(sig).name} {plugin}"))
    assert totals.failures == []
    assert (totals.lost, totals.torn, totals.stray) == (0, 0, 0)
    assert totals.rounds == rounds
    # The rounds did write and acknowledge, and made writes durable both ways.
    assert totals.durable > rounds * 100
    assert totals.flushes_acked > 0
