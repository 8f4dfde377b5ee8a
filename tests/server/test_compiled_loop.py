"""The compiled request loop against the Python loop: the same request streams through a
real in-process server (a real Lua RAM disk, a socketpair) with config.fastpath off and
on, and every byte of the negotiation and of the replies compared.

The Python loop (server/connection.py, server/requests.py) is the reference; the compiled
one (server/_fastpath.c, engaged by server/compiled.py) must answer exactly as it does,
including where it hands a result to the slow path (a Lua pread that fails or returns
something else than a string of the right length) and where it stops (flags, other
commands, big requests, out of range, the stop flag).  The streams are sent in segments,
each after the replies to the one before, so that a segment's first requests meet the
compiled loop.

The last tests check that the loop's plain-request predicate is PlainRequests.admits, and
that the C module refuses to load against protocol layouts it was not built for.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

import pytest

from luanbd.config import ServerConfig
from luanbd.filters import create as create_filter
from luanbd.lua.filter import LuaFilter
from luanbd.lua.startup import LuaStartup
from luanbd.protocol.constants import LARGE_DATA, Cmd
from luanbd.protocol.transmission import _CMDS, PlainRequests
from luanbd.server import compiled
from luanbd.server.requests import RequestHandler
from luanbd.server.service import Service
from protocol import vectors as v

_fastpath = pytest.importorskip("luanbd.server._fastpath")

PAGE = 4096
SIZE = 8 * 1024 * 1024
KiB, MiB = 1024, 1024 * 1024
#: Where the script misbehaves (page-aligned, far from the rest of the streams).
SPECIAL = 5 * MiB
ERROR_AT, NUMBER_AT, SHORT_AT, LONG_AT, TABLE_AT, FULL_AT, DISCONNECT_AT = (
    SPECIAL + i * PAGE for i in range(7))

SCRIPT = Template("""
API_VERSION = $api
thread_model = "$thread_model"
local PAGE = 4096
local ZERO = string.rep("\\0", PAGE)
local size = $size
local pages = {}

function open(readonly) return {} end
function get_size(h) return size end
function can_write(h) return true end
function can_flush(h) return true end
function can_trim(h) return true end
function can_zero(h) return true end
function can_fua(h) return nbdkit.FUA_NATIVE end
function can_cache(h) return nbdkit.CACHE_NATIVE end
function can_extents(h) return true end

local function read(count, offset)
  local parts = {}
  while count > 0 do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, count)
    parts[#parts + 1] = (pages[i] or ZERO):sub(o + 1, o + n)
    offset, count = offset + n, count - n
  end
  return table.concat(parts)
end

local function write(buf, offset)
  local done = 0
  while done < #buf do
    local i, o = offset // PAGE, offset % PAGE
    local n = math.min(PAGE - o, #buf - done)
    local page = pages[i] or ZERO
    pages[i] = page:sub(1, o) .. buf:sub(done + 1, done + n) .. page:sub(o + n + 1)
    offset, done = offset + n, done + n
  end
end

local function clear(count, offset) write(string.rep("\\0", count), offset) end

function pread(h, count, offset, flags)
  -- error level 0: no script path in the text, which reaches the client (issue 16) and
  -- names each run's own script file.
  if offset == $error_at then error("no reading there", 0) end
  if offset == $number_at then return 42 end
  if offset == $short_at then return "abc" end
  if offset == $long_at then return string.rep("L", count + 5) end
  if offset == $table_at then return {} end
  if offset == $disconnect_at then nbdkit.disconnect(false) end
  return read(count, offset)
end

function pwrite(h, buf, offset, flags)
  if offset == $full_at then nbdkit.set_error(nbdkit.ENOSPC); error("disk full", 0) end
  write(buf, offset)
end

function flush(h, flags) end
function trim(h, count, offset, flags) clear(count, offset) end
function zero(h, count, offset, flags) clear(count, offset) end
function cache(h, count, offset, flags) end

function extents(h, count, offset, flags)
  local out = {}
  for i = offset // PAGE, (offset + count - 1) // PAGE do
    out[#out + 1] = { i * PAGE, PAGE, pages[i] and 0 or (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO) }
  end
  return out
end
""")

READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, BLOCK_STATUS = (
    v.CMD_READ, v.CMD_WRITE, v.CMD_DISC, v.CMD_FLUSH, v.CMD_TRIM, v.CMD_CACHE,
    v.CMD_WRITE_ZEROES, v.CMD_BLOCK_STATUS)
FUA, DF = v.FLAG_FUA, v.FLAG_DF
SIMPLE_MAGIC, STRUCTURED_MAGIC = v.SIMPLE_REPLY_MAGIC, v.STRUCTURED_REPLY_MAGIC
#: (cmd, offset, length, flags, payload); length None: the payload's length.
Req = tuple[int, int, int | None, int, bytes]


def rd(offset: int, length: int, flags: int = 0) -> Req:
    return (READ, offset, length, flags, b"")


def wr(offset: int, data: bytes, flags: int = 0) -> Req:
    return (WRITE, offset, None, flags, data)


def cmd(kind: int, offset: int = 0, length: int = 0, flags: int = 0) -> Req:
    return (kind, offset, length, flags, b"")


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(n))


class Client:
    """A minimal newstyle client on one end of a socketpair; ``transcript`` is every byte
    the server sent."""

    def __init__(self, sock: socket.socket, structured: bool) -> None:
        self.sock = sock
        self.sock.settimeout(30)
        self.transcript = bytearray()
        self._cookies = itertools.count(1)
        out = v.client_flags(v.FIXED | v.NO_ZEROES)
        if structured:
            out += v.option(v.OPT_STRUCTURED_REPLY) + v.opt_set_meta(b"", [b"base:allocation"])
        sock.sendall(out + v.opt_go())
        self._recv(18)  # the greeting
        while True:
            _, opt, reply, length = struct.unpack(">QIII", self._recv(20))
            self._recv(length)
            assert not reply & (1 << 31), f"option {opt} refused: {reply:#x}"
            if opt == v.OPT_GO and reply == v.REP_ACK:
                break

    def _recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, f"EOF after {len(data)} of {n} bytes"
            data += chunk
        self.transcript += data
        return bytes(data)

    def _send(self, reqs: list[Req]) -> dict[int, tuple[int, int]]:
        """Send ``reqs`` from a thread (the server may block on replies before it has read
        them all); the request of each cookie."""
        pending, stream = {}, bytearray()
        for kind, offset, length, flags, data in reqs:
            cookie = next(self._cookies)
            size = len(data) if length is None else length
            stream += v.request(kind, flags=flags, cookie=cookie, offset=offset, length=size,
                                data=data)
            if kind != DISC:
                pending[cookie] = (kind, size)
        threading.Thread(target=self.sock.sendall, args=(bytes(stream),), daemon=True).start()
        return pending

    def exchange(self, reqs: list[Req]) -> None:
        """Send a segment and read every reply to it."""
        pending = self._send(reqs)
        while pending:
            magic = struct.unpack(">I", self._recv(4))[0]
            if magic == SIMPLE_MAGIC:
                error, cookie = struct.unpack(">IQ", self._recv(12))
                kind, length = pending.pop(cookie)
                if kind == READ and error == 0:
                    self._recv(length)
            else:
                assert magic == STRUCTURED_MAGIC, hex(magic)
                flags, _, cookie, length = struct.unpack(">HHQI", self._recv(16))
                self._recv(length)
                if flags & 1:  # NBD_REPLY_FLAG_DONE
                    del pending[cookie]

    def until_eof(self, reqs: list[Req]) -> None:
        """Send a last segment and read what comes until the server closes."""
        self._send(reqs)
        while chunk := self.sock.recv(1 << 16):
            self.transcript += chunk


class Server:
    """A Service with one connection on a socketpair, served by a thread of its own."""

    def __init__(self, tmp_path: Path, *, fastpath: bool, readonly: bool = False,
                 api: int = 2, thread_model: str = "serialize_all_requests",
                 memory_limit: int | None = None, filters: tuple[str, ...] = ()) -> None:
        script = tmp_path / f"ram-{fastpath}.lua"
        script.write_text(SCRIPT.substitute(
            api=api, thread_model=thread_model, size=SIZE, error_at=ERROR_AT,
            number_at=NUMBER_AT, short_at=SHORT_AT, long_at=LONG_AT, table_at=TABLE_AT,
            full_at=FULL_AT, disconnect_at=DISCONNECT_AT))
        self.config = ServerConfig(script=str(script), readonly=readonly, fastpath=fastpath,
                                   lua_memory_limit=memory_limit)
        layers = []
        for name in filters:
            if name == "lua":  # a Lua filter that reads and writes through next
                path = tmp_path / f"pass-{fastpath}.lua"
                path.write_text(PASS_FILTER)
                layers.append(LuaFilter(str(path)))
            else:
                layers.append(create_filter(name))
        startup = LuaStartup(self.config, layers)
        chain = startup.load()
        startup.ready(chain)
        startup.after_fork(chain)
        self.plugin = chain.plugin
        self.service = Service(chain, self.config)
        self.client, server = socket.socketpair()
        self.service.handle(server, "")

    def shutdown(self) -> threading.Thread:
        """Begin server shutdown in a thread (it waits for the connection to end); return
        once the connection's stop flag is set."""
        thread = threading.Thread(target=self.service.shutdown_connections, args=(30, 30),
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not all(c.stop.is_set() for c in list(self.service._connections)):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return thread

    def close(self) -> None:
        assert self.service.shutdown_connections(10, grace=10), "connection still running"
        self.client.close()
        self.plugin.cleanup()
        self.plugin.unload()
        os.close(self.service._wake_r)
        os.close(self.service.wakeup_fd)


@pytest.fixture
def python_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the requests the Python loop executes (RequestHandler.handle_request)."""
    counter = [0]
    original = RequestHandler.handle_request

    def counting(self: RequestHandler, req: Any) -> Any:
        counter[0] += 1
        return original(self, req)

    monkeypatch.setattr(RequestHandler, "handle_request", counting)
    yield counter


MAX = LARGE_DATA - 1  # the largest request the compiled loop serves
SIZES = [1, 512, 4 * KiB, MAX, LARGE_DATA, LARGE_DATA + 1, 200 * KiB]

SEGMENTS: list[list[Req]] = [
    # Writes and reads of every size class, pipelined; the reads see the writes.
    [wr(i * 256 * KiB + 3, pattern(n, i)) for i, n in enumerate(SIZES)]
    + [rd(i * 256 * KiB, n + 6) for i, n in enumerate(SIZES)]
    + [rd(i * 256 * KiB + 3, n) for i, n in enumerate(SIZES)],
    # The end of the disk, then out of range (and an offset that overflows).
    [rd(SIZE - 1, 1), rd(SIZE - 4 * KiB, 4 * KiB), rd(SIZE - MAX, MAX),
     wr(SIZE - 2, b"zz"), rd(SIZE - 3, 3), rd(SIZE - 1, 2), rd(SIZE, 1),
     wr(SIZE - 1, b"xy"), rd((1 << 64) - 1, 2), rd(0, 0), rd(SIZE - LARGE_DATA, LARGE_DATA),
     rd(0, 8)],
    # Results the compiled loop leaves to the slow path, between plain requests.
    [rd(ERROR_AT, 8), rd(16, 16), rd(NUMBER_AT, 2), rd(NUMBER_AT, 8), rd(SHORT_AT, 16),
     rd(LONG_AT, 16), rd(TABLE_AT, 4), wr(FULL_AT, b"full"), rd(FULL_AT, 4), rd(0, 4)],
    # Flags: FUA (served by the Python loop), DF, an unknown flag.
    [wr(8 * KiB, b"fua" * 100, FUA), rd(8 * KiB, 300), rd(8 * KiB, 300, DF),
     rd(8 * KiB, 10, 0x40), wr(8 * KiB, b"q", 0x8000), rd(8 * KiB, 4)],
    # Other commands interleaved with plain ones.
    [rd(0, 4 * KiB), cmd(FLUSH), wr(64 * KiB, pattern(8 * KiB, 3)),
     cmd(BLOCK_STATUS, 60 * KiB, 16 * KiB), cmd(TRIM, 64 * KiB, 4 * KiB),
     rd(64 * KiB, 8 * KiB), cmd(ZERO, 68 * KiB, 2 * KiB), rd(64 * KiB, 8 * KiB),
     cmd(CACHE, 0, 64 * KiB), cmd(FLUSH, 0, 1), cmd(99), cmd(BLOCK_STATUS, SIZE, 1),
     wr(0, b"after"), rd(0, 5)],
    # Big reads (the writer thread takes over sending), then small ones under its lock.
    [rd(0, 1 * MiB), rd(MiB, 2 * MiB), rd(0, MAX), *(rd(i * 999, 777) for i in range(50))],
    # Many small requests: more than one batch of the compiled loop, a buffer refilled.
    [*(wr(i * 1000, pattern(700, i)) for i in range(300)),
     *(rd(i * 1000 + 1, 699) for i in range(300))],
]


def run(tmp_path: Path, fastpath: bool, *, structured: bool = True, end: str = "disc",
        **options: Any) -> bytes:
    server = Server(tmp_path, fastpath=fastpath, **options)
    client = Client(server.client, structured)
    for segment in SEGMENTS:
        client.exchange(segment)
    if end == "disc":
        client.until_eof([rd(0, 16), cmd(DISC)])
    elif end == "disconnect":  # nbdkit.disconnect: later requests get ESHUTDOWN, then EOF
        client.until_eof([rd(0, 16), rd(DISCONNECT_AT, 8), rd(0, 16), wr(0, b"late"),
                          cmd(FLUSH), rd(4, 4)])
    else:  # server shutdown: every new request gets ESHUTDOWN until the client leaves
        client.exchange([rd(0, 16)])
        stopping = server.shutdown()
        client.exchange([rd(0, 16), wr(0, b"late"), cmd(FLUSH), rd(4, 4)])
        client.until_eof([rd(0, 16), cmd(DISC)])
        stopping.join(30)
    server.close()
    return bytes(client.transcript)


def compare(tmp_path: Path, counter: list[int], **options: Any) -> bytes:
    python = run(tmp_path / "python", False, **options)
    in_python = counter[0]
    counter[0] = 0
    fast = run(tmp_path / "fast", True, **options)
    assert len(fast) == len(python)
    assert fast == python, f"first difference at byte {first_difference(fast, python)}"
    # The compiled loop did serve: the Python loop saw fewer requests.
    assert counter[0] < in_python
    return python


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


@pytest.fixture
def tmp_dirs(tmp_path: Path) -> Path:
    for name in ("python", "fast"):
        (tmp_path / name).mkdir()
    return tmp_path


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_same_reply_bytes(tmp_dirs: Path, python_requests: list[int], structured: bool) -> None:
    transcript = compare(tmp_dirs, python_requests, structured=structured)
    assert len(transcript) > 4 * MiB  # the big reads came back


@pytest.mark.parametrize("options", [
    {"readonly": True},
    {"api": 1},
    {"thread_model": "parallel"},
    {"memory_limit": 256 * MiB},
], ids=["readonly", "api1", "parallel-no-lock", "memory-limit-writes-in-python"])
def test_same_reply_bytes_other_exports(tmp_dirs: Path, python_requests: list[int],
                                        options: dict[str, Any]) -> None:
    compare(tmp_dirs, python_requests, **options)


PASS_FILTER = """
function pread(next, h, count, offset, flags) return next:pread(count, offset, flags) end
function pwrite(next, h, buf, offset, flags) return next:pwrite(buf, offset, flags) end
"""


@pytest.mark.parametrize("filters", [("lua",), ("cow",), ("lua", "nofilter", "cache")],
                         ids=["lua-filter", "cow", "lua+nofilter+cache"])
def test_same_reply_bytes_through_filters(tmp_dirs: Path, python_requests: list[int],
                                          filters: tuple[str, ...]) -> None:
    """Filters that look at plain requests: the compiled loop calls the chain's first layer
    (backend/context_calls.py) and answers exactly as the Python loop."""
    compare(tmp_dirs, python_requests, filters=filters)


@pytest.mark.parametrize("end", ["disconnect", "shutdown"])
def test_same_reply_bytes_after_the_stop_flag(tmp_dirs: Path, python_requests: list[int],
                                              end: str) -> None:
    transcript = compare(tmp_dirs, python_requests, end=end)
    shutdown = struct.pack(">I", v.SPEC_ERRORS["NBD_ESHUTDOWN"])
    assert transcript.count(struct.pack(">I", SIMPLE_MAGIC) + shutdown) >= 2


# --- one predicate ---------------------------------------------------------------------------

def _edges(plain: PlainRequests) -> Iterator[tuple[int, int, int, int]]:
    size, top = plain.size, plain.max_length
    for length in {0, 1, top - 1, top, top + 1, (1 << 32) - 1}:
        if not 0 <= length < 1 << 32:  # the header's length field
            continue
        offsets = {0, 1, size - length, size - length + 1, size - 1, size, size + 1,
                   (1 << 64) - 1, (1 << 64) - length}
        for offset in offsets:
            if not 0 <= offset < 1 << 64:
                continue
            for flags in (0, FUA, DF, 0x8000):
                for kind in (*range(8), 99, 0xFFFF):
                    yield kind, flags, offset, length


@pytest.mark.parametrize("plain", [
    PlainRequests(SIZE, True, compiled.MAX_LENGTH),
    PlainRequests(SIZE, False, compiled.MAX_LENGTH),
    PlainRequests(compiled.MAX_LENGTH, True, compiled.MAX_LENGTH),
    PlainRequests(0, True, compiled.MAX_LENGTH),
    PlainRequests(1, True, 1),
    PlainRequests((1 << 64) - 1, True, (1 << 32) + 5),
], ids=["rw", "ro", "size=max", "empty", "one-byte", "huge"])
def test_the_loop_admits_exactly_the_plain_requests(plain: PlainRequests) -> None:
    checked = 0
    for kind, flags, offset, length in _edges(plain):
        expected = plain.admits(_CMDS.get(kind, kind), flags, offset, length)
        assert _fastpath.admits(plain, kind, flags, offset, length) is expected, \
            (kind, flags, offset, length)
        checked += 1
    assert checked > 500


def test_engage_gives_the_loop_the_sessions_plain_requests_up_to_its_limit() -> None:
    assert compiled.MAX_LENGTH == LARGE_DATA - 1
    assert PlainRequests(SIZE, True, compiled.MAX_LENGTH).admits(Cmd.READ, 0, 0, MAX)
    assert not PlainRequests(SIZE, True, compiled.MAX_LENGTH).admits(Cmd.READ, 0, 0, LARGE_DATA)


@pytest.mark.parametrize(("name", "value"), [
    ("REQUEST_HEADER", "struct.Struct('>IHHQQQ')"),
    ("STRUCTURED_REPLY_HEADER", "struct.Struct('>IHHQQ')"),
    ("REQUEST_MAGIC", "1 << 40"),
])
def test_the_module_refuses_other_protocol_layouts(name: str, value: str) -> None:
    code = (f"import struct, luanbd.protocol.constants as c\nc.{name} = {value}\n"
            "try:\n    import luanbd.server._fastpath\nexcept ImportError as e:\n"
            "    print('refused:', e)\n"
            "from luanbd.server import compiled\nprint('built', compiled.FASTPATH_BUILT)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith("refused:") and name in out.splitlines()[0], out
    assert out.splitlines()[-1] == "built False"
