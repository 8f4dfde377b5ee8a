"""The compiled loop's poll for the next request (LUANBD_POLL_US, server/_fastpath_poll.c):
it serves back-to-back requests without sleeping, backs off for a slow client, and costs an
idle one nothing.  What it did is read from --metrics (luanbd_request_waits_total)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from luanbd_procs import StartServer, client_env, script
from metrics_client import scrape, value

from luanbd.server.compiled import FASTPATH_BUILT

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

pytestmark = pytest.mark.skipif(not FASTPATH_BUILT, reason="the compiled loop is not built")
DISK = script("disk.lua")
#: Polling needs a CPU for the client besides the polling thread.
CPUS = len(os.sched_getaffinity(0))


def waits(msock: Path) -> dict[str, float]:
    s = scrape(msock)
    return {poll: value(s, "luanbd_request_waits_total", poll=poll)
            for poll in ("hit", "miss", "skipped")}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(CPUS < 2, reason="luanbd polls only with a CPU to spare")
def test_back_to_back_requests_are_met_by_the_poll(start_server: StartServer,
                                                   workdir: Path) -> None:
    msock = workdir / "m.sock"
    server = start_server(DISK, "size=1M", options=[f"--metrics={msock}"])
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for i in range(2000):
        h.pwrite(bytes([i % 251]) * 4096, (i % 256) * 4096)
        assert h.pread(4096, (i % 256) * 4096) == bytes([i % 251]) * 4096
    w = waits(msock)
    h.shutdown()
    # Some waits a busy machine makes longer than the poll; most are met.
    assert w["hit"] > 1000, w


def test_a_slow_client_makes_the_poll_back_off(start_server: StartServer,
                                               workdir: Path) -> None:
    """A request every 3 ms never comes within 50 µs: after two misses in a row the
    connection sleeps at once, for twice as many waits each time."""
    msock = workdir / "m.sock"
    server = start_server(DISK, "size=1M", options=[f"--metrics={msock}"])
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for i in range(300):
        h.pread(512, i * 512)
        time.sleep(0.003)
    w = waits(msock)
    h.shutdown()
    if CPUS < 2:
        assert w == {"hit": 0, "miss": 0, "skipped": 0}
        return
    assert w["miss"] <= 20, w  # 2 per round of backoff: 8, 16, ... 4096 waits
    assert w["skipped"] >= 250, w


def test_an_idle_connection_costs_no_cpu(start_server: StartServer, workdir: Path) -> None:
    server = start_server(DISK, "size=1M")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for i in range(100):
        h.pread(4096, i * 4096)
    before = cpu_seconds(server.proc.pid)
    time.sleep(1.5)
    spent = cpu_seconds(server.proc.pid) - before
    h.shutdown()
    assert spent < 0.1


def test_poll_off(start_server: StartServer, workdir: Path) -> None:
    msock = workdir / "m.sock"
    server = start_server(DISK, "size=1M", options=[f"--metrics={msock}"],
                          env=client_env(LUANBD_POLL_US="0"))
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for i in range(200):
        h.pwrite(bytes([i]) * 4096, i * 4096)
    assert all(h.pread(4096, i * 4096) == bytes([i]) * 4096 for i in range(200))
    h.shutdown()
    assert waits(msock) == {"hit": 0, "miss": 0, "skipped": 0}
