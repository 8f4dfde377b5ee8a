"""--sparse-reads: the zero ranges of a READ as NBD_REPLY_TYPE_OFFSET_HOLE chunks (issue 16).

libnbd's pread_structured sees the chunks (hole, data, hole) and the bytes are the same as
without the option; NBD_CMD_FLAG_DF gets one data chunk; without the option every READ is
one chunk; the raw extended-headers client checks the hole chunk's bytes; nbdcopy
--no-extents (which reads every byte) copies the disk exactly.
"""

from __future__ import annotations

import struct
from pathlib import Path

import nbd
from luanbd_procs import REP_ACK, StartServer, client_env, run_client
from test_extended_headers import CMD_READ, OPT_EXTENDED_HEADERS, REPLY_FLAG_DONE, ExtClient

SPARSE = str(Path(__file__).resolve().parents[2] / "examples" / "sparse.lua")
K64 = 65536
TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE = 1, 2


def _chunks(uri: str, count: int, offset: int,
            flags: int = 0) -> tuple[list[tuple[int, int, int]], bytes]:
    h = nbd.NBD()
    h.connect_uri(uri)
    chunks: list[tuple[int, int, int]] = []
    buf = h.pread_structured(count, offset,
                             lambda sub, off, st, err: chunks.append((off, len(sub), st)) or 0,
                             flags)
    h.shutdown()
    return chunks, buf


def _write(uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"a" * 8192, K64)
    h.pwrite(b"b" * 100, 3 * K64 + 10)
    h.shutdown()


def test_holes_as_chunks(start_server: StartServer) -> None:
    server = start_server(SPARSE, "size=1M", options=["--sparse-reads"])
    _write(server.uri)
    expected = (bytes(K64) + b"a" * 8192 + bytes(2 * K64 - 8192 + 10) + b"b" * 100
                + bytes(K64 - 110))
    chunks, buf = _chunks(server.uri, 4 * K64, 0)
    assert buf == expected
    hole, data = nbd.READ_HOLE, nbd.READ_DATA
    # sparse.lua's pages are 4 KiB: the page holding the "b"s is data.
    assert chunks == [(0, K64, hole), (K64, 8192, data), (K64 + 8192, 2 * K64 - 8192, hole),
                      (3 * K64, 4096, data), (3 * K64 + 4096, K64 - 4096, hole)]
    chunks, buf = _chunks(server.uri, 4 * K64, 0, nbd.CMD_FLAG_DF)
    assert buf == expected and chunks == [(0, 4 * K64, data)]
    assert server.errors() == []


def test_off_by_default(start_server: StartServer) -> None:
    server = start_server(SPARSE, "size=1M")
    _write(server.uri)
    chunks, _ = _chunks(server.uri, 4 * K64, 0)
    assert chunks == [(0, 4 * K64, nbd.READ_DATA)]


def test_extended_hole_chunk_bytes(start_server: StartServer) -> None:
    server = start_server(SPARSE, "size=1M", options=["--sparse-reads"])
    _write(server.uri)
    assert server.sock is not None
    with ExtClient(server.sock) as c:
        c.start()
        c.send_option(OPT_EXTENDED_HEADERS)
        assert c.option_reply()[1] == REP_ACK
        assert c.go() == REP_ACK
        c.request(CMD_READ, 0, K64 + 4096, cookie=8)
        flags, rtype, cookie, offset, payload = c.chunk()
        assert (flags, rtype, cookie, offset) == (0, TYPE_OFFSET_HOLE, 8, 0)
        assert payload == struct.pack(">QI", 0, K64)
        flags, rtype, cookie, offset, payload = c.chunk()
        assert (flags, rtype, cookie, offset) == (REPLY_FLAG_DONE, TYPE_OFFSET_DATA, 8, 0)
        assert payload == struct.pack(">Q", K64) + b"a" * 4096


def test_nbdcopy_without_extents_copies_exactly(start_server: StartServer,
                                                workdir: Path) -> None:
    server = start_server(SPARSE, "size=8M", options=["--sparse-reads"])
    _write(server.uri)
    out = workdir / "copy.img"
    run_client(["nbdcopy", "--no-extents", server.uri, str(out)], env=client_env())
    data = out.read_bytes()
    assert len(data) == 8 << 20
    assert data[K64:K64 + 8192] == b"a" * 8192 and data[3 * K64 + 10:3 * K64 + 110] == b"b" * 100
    assert data.count(0) == len(data) - 8292
