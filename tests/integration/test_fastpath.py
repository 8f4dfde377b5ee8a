"""The compiled request loop (luanbd/server/_fastpath.c), byte by byte over a socketpair.

Connection._transmission hands plain small READ/WRITE requests to _fastpath.serve (through
server/compiled.py) and keeps every other request for itself.  These tests drive serve()
directly with a real Lua script, a real socket and a CompiledLoop: replies byte-exact, the
loop stopping at the first request that is not its own (with the position of that
request), error results going through the slow callback, payloads that arrive in pieces,
the stop flag, and end of stream.  Real clients through the whole server, with the loop
on and off, are at the end (tests/server/test_compiled_loop.py compares reply streams).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from string import Template
from typing import Any

import pytest
from luanbd_procs import StartServer, client_env

from luanbd.lua.plugin import LuaPlugin
from luanbd.protocol.constants import REQUEST_MAGIC
from luanbd.protocol.replies import read_chunk_reply, simple_reply
from luanbd.protocol.transmission import PlainRequests
from luanbd.server.compiled import MAX_LENGTH, CompiledLoop
from luanbd.server.requests import StopFlag

_fastpath = pytest.importorskip("luanbd.server._fastpath")

SIZE = 1 << 20
#: Where the script fails: error() on reads, a number for reads, ENOSPC for writes.
ERROR_AT, NUMBER_AT, FULL_AT = SIZE - 3 * 4096, SIZE - 2 * 4096, SIZE - 4096
SCRIPT = Template("""
local disk = {}
function open(readonly) return {} end
function get_size(h) return $size end
function pread(h, count, offset)
  if offset == $error_at then error("no reading there") end
  if offset == $number_at then return 42 end
  local out = {}
  for i = offset, offset + count - 1 do out[#out + 1] = disk[i] or "\\0" end
  return table.concat(out)
end
function pwrite(h, buf, offset)
  if offset == $full_at then nbdkit.set_error(nbdkit.ENOSPC); error("disk full") end
  for i = 1, #buf do disk[offset + i - 1] = buf:sub(i, i) end
end
""").substitute(size=SIZE, error_at=ERROR_AT, number_at=NUMBER_AT,
                  full_at=FULL_AT)

HEADER = struct.Struct(">IHHQQI")
READ, WRITE, FLUSH = 0, 1, 3


def request(cmd: int, cookie: int, offset: int, length: int, *, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return HEADER.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


class Loop:
    """serve() on one end of a socketpair, run in a thread; the test is the client."""

    def __init__(self, tmp_path: Path, *, structured: bool = False,
                 writable: bool = True) -> None:
        path = tmp_path / "bytes.lua"
        path.write_text(SCRIPT)
        self.plugin = LuaPlugin(str(path))
        self.handle = self.plugin.open(False)
        self.client, self.server = socket.socketpair()
        self.stop = StopFlag()
        self.slow_calls: list[tuple[int, int, int, int]] = []
        call, pread, pwrite, api2 = self.plugin.fastpath_calls()
        self.lock: Any = threading.Lock()
        self.setup = CompiledLoop(
            fd=self.server.fileno(), plain=PlainRequests(SIZE, writable, MAX_LENGTH),
            structured=structured, call=call, pread=pread, pwrite=pwrite if writable else None,
            handle=self.handle, api2=api2, lock=self.lock, stop=self.stop, slow=self.slow)
        self.buf = bytearray(256 * 1024)
        self.result: Any = None

    def slow(self, cmd: int, cookie: int, offset: int, count: int, res: Any) -> list[bytes]:
        self.slow_calls.append((cmd, cookie, offset, count))
        return [b"SLOW" + struct.pack(">Q", cookie)]

    def start(self, pos: int = 0, end: int = 0) -> threading.Thread:
        def run() -> None:
            try:
                self.result = _fastpath.serve(self.setup, self.buf, pos, end, None)
            except Exception as err:  # handed to the test
                self.result = err
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def recv_exactly(self, n: int) -> bytes:
        self.client.settimeout(10)
        data = b""
        while len(data) < n:
            chunk = self.client.recv(n - len(data))
            assert chunk, f"EOF after {len(data)} of {n} bytes"
            data += chunk
        return data

    def finish(self, thread: threading.Thread) -> Any:
        thread.join(10)
        assert not thread.is_alive()
        return self.result


def test_pipelined_reads_and_writes_get_byte_exact_replies(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    thread = loop.start()
    stream, expected = b"", b""
    for i in range(100):
        offset = 65536 + i * 700
        data = bytes([i % 251]) * 500
        stream += request(WRITE, 2 * i, offset, len(data), payload=data)
        stream += request(READ, 2 * i + 1, offset - 100, 600)
        expected += simple_reply(2 * i)[0]
        # The 100 bytes before each write are between two writes: zeroes.
        expected += b"".join(simple_reply(2 * i + 1, data=bytes(100) + data))
    loop.client.sendall(stream)
    assert loop.recv_exactly(len(expected)) == expected
    loop.client.shutdown(socket.SHUT_WR)
    pos, end, eof = loop.finish(thread)
    assert eof is True and pos == end
    assert loop.slow_calls == []


def test_structured_reads_are_offset_data_chunks(tmp_path: Path) -> None:
    loop = Loop(tmp_path, structured=True)
    thread = loop.start()
    loop.client.sendall(request(WRITE, 7, 100, 3, payload=b"abc") + request(READ, 8, 99, 5))
    expected = simple_reply(7)[0] + b"".join(read_chunk_reply(8, 99, b"\0abc\0"))
    assert loop.recv_exactly(len(expected)) == expected
    loop.client.close()
    assert loop.finish(thread)[2] is True


@pytest.mark.parametrize(("name", "req"), [
    ("flush", request(FLUSH, 9, 0, 0)),
    ("a flag (FUA)", request(WRITE, 9, 0, 1, flags=1, payload=b"x")),
    ("64 KiB", request(READ, 9, 0, 65536)),
    ("past the end", request(READ, 9, SIZE - 10, 11)),
    ("offset overflow", request(READ, 9, (1 << 64) - 1, 2)),
    ("zero length", request(READ, 9, 0, 0)),
    ("bad magic", b"\x00" * 28),
])
def test_stops_at_the_first_request_it_leaves_to_python(tmp_path: Path, name: str,
                                                       req: bytes) -> None:
    loop = Loop(tmp_path)
    first = request(READ, 1, 0, 16)
    tail = request(READ, 2, 0, 16)  # after the stop: not executed by the loop
    stream = first + req + tail
    loop.buf[:len(stream)] = stream
    pos, end, eof = loop.finish(loop.start(0, len(stream)))
    assert (pos, end, eof) == (len(first), len(stream), False), name
    reply = b"".join(simple_reply(1, data=bytes(16)))
    assert loop.recv_exactly(len(reply)) == reply
    loop.client.setblocking(False)
    with pytest.raises(BlockingIOError):
        loop.client.recv(1)  # nothing for the requests from the stop on


def test_read_only_export_leaves_writes_to_python(tmp_path: Path) -> None:
    loop = Loop(tmp_path, writable=False)
    stream = request(WRITE, 1, 0, 1, payload=b"x")
    loop.buf[:len(stream)] = stream
    assert loop.finish(loop.start(0, len(stream))) == (0, len(stream), False)


def test_results_other_than_success_go_through_slow(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    thread = loop.start()
    loop.client.sendall(request(READ, 1, ERROR_AT, 8)        # error()
                        + request(READ, 2, NUMBER_AT, 8)      # a number
                        + request(WRITE, 3, FULL_AT, 2, payload=b"zz"))  # ENOSPC
    loop.client.sendall(request(READ, 4, 0, 4))
    expected = (b"SLOW" + struct.pack(">Q", 1) + b"SLOW" + struct.pack(">Q", 2)
                + b"SLOW" + struct.pack(">Q", 3) + b"".join(simple_reply(4, data=bytes(4))))
    assert loop.recv_exactly(len(expected)) == expected
    assert loop.slow_calls == [(READ, 1, ERROR_AT, 8), (READ, 2, NUMBER_AT, 8),
                               (WRITE, 3, FULL_AT, 2)]
    loop.client.close()
    loop.finish(thread)


def test_a_payload_that_trickles_in(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    thread = loop.start()
    payload = bytes(range(256)) * 200  # 51,200 bytes, under MAX_LENGTH
    stream = request(WRITE, 1, 1000, len(payload), payload=payload) + request(READ, 2, 1000,
                                                                            len(payload))
    # Header split in two, then the payload in uneven pieces.
    for piece in (stream[:5], stream[5:28], *[stream[i:i + 7777]
                                              for i in range(28, len(stream), 7777)]):
        loop.client.sendall(piece)
        time.sleep(0.002)
    expected = simple_reply(1)[0] + b"".join(simple_reply(2, data=payload))
    assert loop.recv_exactly(len(expected)) == expected
    loop.client.close()
    assert loop.finish(thread)[2] is True


def test_the_buffer_is_reused_across_many_receives(tmp_path: Path) -> None:
    # 3 MiB of requests through a 256 KiB buffer: unparsed tails move to the front.
    loop = Loop(tmp_path)
    thread = loop.start()
    expected = []

    def client_writes() -> None:
        for i in range(3000):
            data = bytes([i % 256]) * 1000
            loop.client.sendall(request(WRITE, i, (i % 1000) * 1000, 1000, payload=data))
        loop.client.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=client_writes)
    writer.start()
    for i in range(3000):
        expected.append(simple_reply(i)[0])
    assert loop.recv_exactly(16 * 3000) == b"".join(expected)
    writer.join(10)
    assert loop.finish(thread)[2] is True


def test_the_stop_flag_hands_back_before_executing(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    loop.stop.set()
    stream = request(WRITE, 1, 0, 1, payload=b"x")
    loop.buf[:len(stream)] = stream
    assert loop.finish(loop.start(0, len(stream))) == (0, len(stream), False)
    assert loop.plugin.pread(loop.handle, 1, 0, 0) == b"\0"  # not written


def test_lua_errors_outside_the_callbacks_propagate(tmp_path: Path) -> None:
    # An exception from a callable (here the lock) ends serve() with that exception, as
    # it would end the Python loop.
    loop = Loop(tmp_path)

    class Broken:
        def acquire(self) -> None:
            raise RuntimeError("lock broke")

        def release(self) -> None:
            pass

    loop.setup.lock = Broken()
    stream = request(READ, 1, 0, 1)
    loop.buf[:len(stream)] = stream
    result = loop.finish(loop.start(0, len(stream)))
    assert isinstance(result, RuntimeError) and str(result) == "lock broke"


# --- through the whole server, with real clients -------------------------------------------

NBDSH_SCRIPT = Template(r"""
import nbd
h.set_request_structured_replies($structured)
h.connect_uri(uri)
out = []
for i in range(64):
    h.pwrite(bytes([i]) * (512 + i), i * 4096 + i)
for i in range(64):
    out.append(h.pread(1000, i * 4096).hex())
for off in ($error_at, $number_at):
    try:
        h.pread(8, off)
    except nbd.Error as e:
        out.append(str(e.errno))
try:
    h.pwrite(b"zz", $full_at)
except nbd.Error as e:
    out.append(str(e.errno))
print("\n".join(out))
""")


@pytest.mark.parametrize("structured", ["True", "False"])
def test_same_answers_with_the_loop_on_and_off(start_server: StartServer, tmp_path: Path,
                                               structured: str) -> None:
    script = tmp_path / "bytes.lua"
    script.write_text(SCRIPT)
    outputs, errors = [], []
    for value in ("1", "0"):
        server = start_server(str(script), env=client_env(LUANBD_FASTPATH=value))
        code = NBDSH_SCRIPT.substitute(structured=structured, error_at=ERROR_AT,
                                       number_at=NUMBER_AT, full_at=FULL_AT)
        out = subprocess.run(["nbdsh", "-c", f"uri = {server.uri!r}", "-c", code],
                             capture_output=True, text=True, env=client_env(), timeout=60,
                             check=False)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout)
        errors.append(server.errors())
    assert outputs[0] == outputs[1]
    assert outputs[0].splitlines()[-3:] == ["EIO", "EIO", "ENOSPC"]
    assert errors[0] == errors[1] and len(errors[0]) == 3
