"""server/transport.py: the bytes a big WRITE payload is received into (the I/O trick the
sans-IO RequestParser is handed as its payload_buffer)."""

from __future__ import annotations

import pytest

from luanbd.protocol.constants import LARGE_DATA, Cmd
from luanbd.protocol.handshake import NEED_DATA
from luanbd.protocol.transmission import Request, RequestParser
from luanbd.server.transport import writable_bytes
from protocol import vectors as v

_MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(writable_bytes is None, reason="not CPython")


def _feed(parser: RequestParser, data: bytes, size: int = _MiB) -> list[Request]:
    got = []
    for pos in range(0, len(data), size):
        parser.receive_data(data[pos:pos + size])
        while (req := parser.next_request()) is not NEED_DATA:
            assert isinstance(req, Request)
            got.append(req)
    return got


@pytest.mark.parametrize("size", [1, 4095, 65536, 100_003, 3 * 65536 + 28])
def test_big_write_payload_received_in_place(size: int) -> None:
    """A WRITE of LARGE_DATA bytes or more is received straight into the bytes object
    the plugin gets: same requests, whatever the chunking, and what follows the payload in
    the same read is parsed after it."""
    payload = bytes(range(256)) * 1024  # 256 KiB >= LARGE_DATA
    assert len(payload) >= LARGE_DATA
    stream = (v.request(v.CMD_READ, cookie=1, length=512)
              + v.request(v.CMD_WRITE, cookie=2, offset=8192, data=payload)
              + v.request(v.CMD_WRITE, cookie=3, data=payload[:LARGE_DATA])
              + v.request(v.CMD_FLUSH, cookie=4))
    got = _feed(RequestParser(chunk=64 * 1024, payload_buffer=writable_bytes), stream, size=size)
    assert got == [Request(Cmd.READ, 0, 1, 0, 512, None),
                   Request(Cmd.WRITE, 0, 2, 8192, len(payload), payload),
                   Request(Cmd.WRITE, 0, 3, 0, LARGE_DATA, payload[:LARGE_DATA]),
                   Request(Cmd.FLUSH, 0, 4, 0, 0, None)]
    assert all(type(r.data) is bytes for r in got if r.data is not None)
    assert hash(got[1].data) == hash(bytes(payload))  # a sound, immutable bytes object


def test_direct_payload_buffer_is_the_final_object() -> None:
    """get_buffer() hands out the payload's own memory: no copy after the kernel's."""
    payload = b"\x11" * (2 * LARGE_DATA)
    header = v.request(v.CMD_WRITE, cookie=9, data=payload)[:28]
    parser = RequestParser(payload_buffer=writable_bytes)
    parser.receive_data(header + payload[:10])
    assert parser.next_request() is NEED_DATA
    with parser.get_buffer() as view:
        assert len(view) == len(payload) - 10
        view[:] = payload[10:]
    parser.commit(len(payload) - 10)
    req = parser.next_request()
    assert isinstance(req, Request) and req.data == payload


def test_write_payload_that_cannot_be_allocated() -> None:
    """No memory for a WRITE's payload: it is dropped as it arrives (the stream stays in
    step) and the request comes out without data, which the server answers with ENOMEM."""
    def no_memory(n: int) -> tuple[bytes, memoryview]:
        raise MemoryError

    payload = b"\x42" * (2 * LARGE_DATA)
    stream = (v.request(v.CMD_WRITE, cookie=1, data=payload)
              + v.request(v.CMD_READ, cookie=2, length=512))
    got = _feed(RequestParser(payload_buffer=no_memory), stream, size=4096 + 28)
    assert got == [Request(Cmd.WRITE, 0, 1, 0, len(payload), None),
                   Request(Cmd.READ, 0, 2, 0, 512, None)]
