"""A client that pipelines many big READs and never reads the replies (issue 5): the server
must hold it back through the socket (backpressure) with bounded memory, keep serving others,
and still answer every request in order once the client reads.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import nbd
from luanbd_procs import CMD_READ, REQUEST_MAGIC, RawClient, StartServer, script

DISK = script("disk.lua")
MiB = 1024 * 1024
#: Requests pipelined; with 32 MiB each, 64 GiB of replies if the server buffered them.
REQUESTS = 2000
LENGTH = 32 * MiB


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_unread_replies_do_not_pile_up(start_server: StartServer) -> None:
    server = start_server(DISK, "size=64M")
    pid = server.proc.pid
    before = rss_mib(pid)
    with RawClient(server.sock) as client:  # type: ignore[arg-type]
        client.connect_export()
        headers = b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, 0, LENGTH)
            for cookie in range(1, REQUESTS + 1))
        client.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(headers) and time.monotonic() < deadline:
            try:
                sent += client.sock.send(headers[sent:])
            except BlockingIOError:
                time.sleep(0.05)
        time.sleep(2.0)  # let the server run as far as it can
        peak = rss_mib(pid)
        # A few replies in flight at most: the writer's queue, the batch being built.
        assert peak - before < 400, f"RSS grew from {before:.0f} to {peak:.0f} MiB"

        # Another client is served meanwhile.
        h = nbd.NBD()
        h.connect_uri(server.uri)
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()

        # The stalled client reads: its first replies arrive whole and in order.
        client.sock.setblocking(True)
        client.sock.settimeout(20)
        for cookie in range(1, 6):
            error, got, data = client.reply(LENGTH)
            assert (error, got, len(data)) == (0, cookie, LENGTH)
    assert server.alive()
    print(f"\nRSS before {before:.0f} MiB, with {REQUESTS} x 32 MiB READs pipelined and "
          f"unread: {peak:.0f} MiB")
