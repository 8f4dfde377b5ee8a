"""Large READs are sent from Lua's memory (luanbd.lua.pinning): real clients see the
right bytes under concurrency, with and without structured replies, and clients that
vanish with large replies in flight leave nothing pinned behind.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import nbd
import pytest
from luanbd_procs import Server, StartServer

RAMDISK = str(Path(__file__).resolve().parents[2] / "examples" / "ramdisk.lua")
MiB = 1024 * 1024
SIZE = 32 * MiB
#: Request sizes above and below luanbd.lua.pinning.PIN_MIN (64 KiB), odd ones included.
SIZES = (MiB, 256 * 1024, 65536, 65536 + 512, 4096, 3 * MiB + 4096)


def pattern(offset: int, length: int) -> bytes:
    """Bytes that differ at every offset of the disk, so a misplaced read shows."""
    out = bytearray()
    block = offset // 4096
    while len(out) < (offset % 4096) + length:
        out += hashlib.sha256(block.to_bytes(8, "little")).digest() * 128
        block += 1
    start = offset % 4096
    return bytes(out[start:start + length])


def filled(start_server: StartServer) -> Server:
    server = start_server(RAMDISK, f"size={SIZE}")
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for off in range(0, SIZE, 4 * MiB):
        h.pwrite(pattern(off, 4 * MiB), off)
    h.shutdown()
    return server


@pytest.mark.parametrize("structured", [True, False])
def test_concurrent_large_reads_return_the_right_bytes(start_server: StartServer,
                                                       structured: bool) -> None:
    server = filled(start_server)
    errors: list[str] = []

    def reader(seed: int) -> None:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.connect_uri(server.uri)
        try:
            assert h.get_structured_replies_negotiated() == structured
            bufs = []
            for i in range(48):
                length = SIZES[(seed + i) % len(SIZES)]
                offset = ((seed * 7919 + i * 104729) * 512) % (SIZE - length)
                buf = nbd.Buffer(length)
                h.aio_pread(buf, offset)
                bufs.append((buf, offset, length))
                while h.aio_in_flight() >= 16:
                    h.poll(-1)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for buf, offset, length in bufs:
                if buf.to_bytearray() != pattern(offset, length):
                    errors.append(f"reader {seed}: {length} bytes at {offset} differ")
        finally:
            h.shutdown()

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert server.errors() == []


def test_clients_vanishing_with_large_replies_in_flight(start_server: StartServer) -> None:
    server = filled(start_server)
    for _ in range(20):
        h = nbd.NBD()
        h.connect_uri(server.uri)
        for i in range(32):
            h.aio_pread(nbd.Buffer(MiB), (i * MiB) % SIZE)
        h.poll(0)
        del h  # closes the socket with most replies unsent
    # The server goes on, data intact, and what the dropped replies pinned is reusable:
    # a client can still write over every byte and read it back.
    h = nbd.NBD()
    h.connect_uri(server.uri)
    assert h.pread(3 * MiB, 5 * MiB) == pattern(5 * MiB, 3 * MiB)
    h.pwrite(b"\xa5" * SIZE, 0)
    assert h.pread(SIZE, 0) == b"\xa5" * SIZE
    h.shutdown()
    assert server.alive()
