"""The soak run in the default suite: 60 seconds, or ``LUANBD_SOAK_SECONDS`` seconds (the long run:
``python tests/soak/run.py --seconds 600``, or ``LUANBD_SOAK_SECONDS=600 pytest
tests/soak``).  soak.py says which clients run; here the figures are checked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import soak

SECONDS = float(os.environ.get("LUANBD_SOAK_SECONDS", "60"))
MiB = 1 << 20
#: RSS growth allowed from the start (once listening) to the end (the last client gone):
#: glibc keeps up to 64 MiB of freed memory at the heap's top (M_TRIM_THRESHOLD, set by
#: luanbd.server.lifecycle.tune_malloc), plus Python's and Lua's own free lists.
RSS_GROWTH = 160 * MiB


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("fio") is None
                    or shutil.which("nbdcopy") is None,
                    reason="openssl, fio and nbdcopy are needed (scripts/setup.sh)")
@pytest.mark.timeout(SECONDS + 240)
def test_soak(tmp_path: Path) -> None:
    f = soak.Soak(tmp_path, SECONDS).run()
    print("\n".join(f.lines()))
    assert f.failures == []
    # Every kind of client ran, and was served.
    for kind in ("fio verify runs", "nbdcopy round trips", "vanishing clients",
                 "silent clients", "TLS connections", "flaky requests", "reloads"):
        assert f.done[kind] > 0, kind
    # Every reload took, and every generation was unloaded (its stats report written).
    assert f.generations == f.done["reloads"] + 1
    assert f.served > f.done["fio requests"] > 0
    # The only errors clients saw are the flaky export's injected ones, about 1 % of its
    # requests (each of the three errnos about a third of them).
    assert set(f.errors) <= soak.INJECTED
    failed = sum(f.errors.values())
    assert 0.003 < failed / (failed + f.done["flaky requests"]) < 0.03, f.errors
    assert f.log_errors["random failure"] == failed
    assert set(f.log_errors) <= {"random failure", "handshake timeout"}, f.log_errors
    # Resources: back to where they started.
    assert f.fds_end == f.fds_start
    assert f.threads_end == f.threads_start
    if not os.environ.get("LUANBD_SANITIZED"):  # ASan's quarantine and shadow are RSS too
        assert f.rss_end - f.rss_start <= RSS_GROWTH
