"""The delay filter's sleep ends when the server stops (nbdkit_nanosleep), under nbdkit and
luanbd alike: SIGTERM during a 30-second read delay stops the server within seconds, and
the log has nbdkit's line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import PLUGINS, _listening, nbdkit_available  # noqa: E402

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))


@pytest.mark.parametrize("server", ["nbdkit", "luanbd"])
def test_sigterm_ends_a_delayed_read(server: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "sock")
        prog = ["nbdkit", "-f", "--filter=delay", "-U", sock, "lua"] if server == "nbdkit" \
            else [sys.executable, "-m", "luanbd", "-f", "--filter=delay", "-U", sock]
        proc = subprocess.Popen([*prog, str(PLUGINS / "ramdisk.lua"), "rdelay=30"],
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 15
            while not _listening(sock):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            h = nbd.NBD()
            h.connect_unix(sock)
            h.aio_pread(nbd.Buffer(512), 0)
            time.sleep(1)  # the read is asleep in the filter
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            assert time.monotonic() - start < 8
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=10)
        assert "aborting sleep because of server shut down" in err
        assert "Traceback" not in err
