#!/usr/bin/env python3
"""atheris harness: the compiled request loop itself (``luanbd.server._fastpath.serve``),
fed mutated request streams over a socketpair, against a small Lua RAM disk.

Each input configures one CompiledLoop (as server/compiled.py's ``engage`` builds it) and a
receive buffer with part of the stream already in it (as the Python loop hands over
trailing bytes), sends the rest over the socket in pieces and half-closes.  The replies, the
position and end where serve() handed back, the eof flag and the slow-path calls are then
checked against a reference computed in Python: the Python loop's own request predicate
(``PlainRequests.admits``) and reply encoders (``protocol/replies.py``) over a Python copy of
the disk.  Run it on the sanitized build (scripts/sanitize.sh) to catch memory errors in C.

Input layout:

====== =====================================================================================
byte 0 bit 0 structured replies, bit 1 writable, bits 2-3 export size (256 KiB, 256 KiB - 1,
       4096, 0), bits 4-5 max_length (64 KiB - 1, 4096, 512, 1), bit 6 a request lock,
       bit 7 the slow callback sets the stop flag (as ``nbdkit.disconnect`` does)
byte 1 bits 0-1 buffer capacity (just room for one request, +1, +100, 256 KiB), bits 2-3
       max_batch (4 MiB, 0, 1, 4096), bits 4-7 bytes of the stream already in the buffer
       (x 11, at most the capacity)
byte 2 chunking seed of the rest: 0 whole, else pieces of 1..seed+1 bytes
byte 3 where in the buffer those bytes start (x 3, within the buffer)
rest   the client's request stream (classic headers)
====== =====================================================================================

The disk's special places: a pread at ERROR_AT fails (a Lua error), at NUMBER_AT it returns a
number, at SHORT_AT a short string; a pwrite at FULL_AT fails with ENOSPC.  Each goes to the
slow callback.  ``LUANBD_FUZZ_INJECT=1`` gives the plugin a pread that gets one byte wrong at
offset 4096, which the comparison must report.

    python fuzz/fuzz_fastpath.py fuzz/corpus/fastpath -max_total_time=60
    python fuzz/fuzz_fastpath.py --replay fuzz/corpus/fastpath   # each seed once, no atheris
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzlib

if __name__ == "__main__" and not {"--replay", "--seeds"} & set(sys.argv):
    fuzzlib.instrument_luanbd()

from fuzzlib import Finding, chunks

from luanbd.lua.plugin import LuaPlugin
from luanbd.protocol.constants import REQUEST_MAGIC, Cmd
from luanbd.protocol.replies import read_chunk_reply, simple_reply
from luanbd.protocol.transmission import _CMDS, PlainRequests
from luanbd.server import _fastpath
from luanbd.server.compiled import MAX_LENGTH, CompiledLoop
from luanbd.server.requests import StopFlag
from luanbd.server.transport import MAX_BATCH

PAGE = 4096
SIZE = 256 * 1024
ERROR_AT, NUMBER_AT, SHORT_AT, FULL_AT = (SIZE - (4 - i) * PAGE for i in range(4))
SIZES = (SIZE, SIZE - 1, PAGE, 0)
MAX_LENGTHS = (MAX_LENGTH, PAGE, 512, 1)
BATCHES = (MAX_BATCH, 0, 1, PAGE)
HEADER = struct.Struct(">IHHQQI")

SCRIPT = """
local PAGE = 4096
local ZERO = string.rep("\\0", PAGE)
local pages = {}
function open(readonly) return {} end
function get_size(h) return %(size)d end
local function read(count, offset)
  local parts = {}
  while count > 0 do
    local i, o = offset // PAGE, offset %% PAGE
    local n = math.min(PAGE - o, count)
    parts[#parts + 1] = (pages[i] or ZERO):sub(o + 1, o + n)
    offset, count = offset + n, count - n
  end
  return table.concat(parts)
end
function pread(h, count, offset)
  if offset == %(error_at)d then error("no reading there") end
  if offset == %(number_at)d then return 42 end
  if offset == %(short_at)d then return "abc" end
  local data = read(count, offset)
  if %(inject)s and offset <= 4096 and offset + count > 4096 then
    local at = 4096 - offset
    data = data:sub(1, at) .. "!" .. data:sub(at + 2)
  end
  return data
end
function pwrite(h, buf, offset)
  if offset == %(full_at)d then nbdkit.set_error(nbdkit.ENOSPC); error("disk full") end
  local done = 0
  while done < #buf do
    local i, o = offset // PAGE, offset %% PAGE
    local n = math.min(PAGE - o, #buf - done)
    local page = pages[i] or ZERO
    pages[i] = page:sub(1, o) .. buf:sub(done + 1, done + n) .. page:sub(o + n + 1)
    offset, done = offset + n, done + n
  end
end
"""


class Disk:
    """The Lua plugin (loaded once per process) and the Python copy of what it holds."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="luanbd-fuzz-fastpath-")
        path = Path(self._dir.name) / "disk.lua"
        path.write_text(SCRIPT % dict(size=SIZE, error_at=ERROR_AT, number_at=NUMBER_AT,
                                      short_at=SHORT_AT, full_at=FULL_AT,
                                      inject="true" if fuzzlib.injecting() else "false"))
        self.plugin = LuaPlugin(str(path))
        self.handle = self.plugin.open(False)
        self.calls = self.plugin.fastpath_calls()
        self.data = bytearray(SIZE)


_disk: Disk | None = None


def disk() -> Disk:
    global _disk
    if _disk is None:
        _disk = Disk()
    return _disk


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Finding(message)


def slow_reply(cmd: int, cookie: int, offset: int, count: int) -> list[bytes | memoryview]:
    """What the slow callback answers: 1 to 8 buffers (the most serve() takes, MAX_LIST),
    some empty, some memoryviews, picked by the cookie; 128 replies of 8 fill IOV_MAX."""
    body = b"SLOW" + struct.pack(">HQQI", cmd, cookie, offset, count)
    cuts = sorted((cookie >> (3 + 5 * i)) % (len(body) + 1) for i in range(cookie % 8))
    bounds = [0, *cuts, len(body)]
    return [body[a:b] if i % 2 else memoryview(body)[a:b]
            for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def reference(d: Disk, plain: PlainRequests, structured: bool, stop_on_slow: bool,
              stream: bytes) -> tuple[bytes, list[tuple[int, int, int, int]], int, bool]:
    """What serve() must do with ``stream`` (then EOF): the reply bytes, the slow calls, the
    stream position it hands back at, and whether that is at EOF.  Updates the disk copy."""
    out, slow = bytearray(), list[tuple[int, int, int, int]]()
    pos, stopped = 0, False
    while len(stream) - pos >= HEADER.size:
        magic, flags, kind, cookie, offset, length = HEADER.unpack_from(stream, pos)
        if magic != REQUEST_MAGIC or not plain.admits(_CMDS.get(kind, kind), flags, offset,
                                                      length):
            return bytes(out), slow, pos, False
        if kind == Cmd.WRITE and len(stream) - pos - HEADER.size < length:
            return bytes(out), slow, pos, True  # the payload never came
        if stopped:
            return bytes(out), slow, pos, False
        if kind == Cmd.READ:
            special = offset in (ERROR_AT, NUMBER_AT, SHORT_AT)
            data = bytes(d.data[offset:offset + length])
            parts = (slow_reply(kind, cookie, offset, length) if special else
                     read_chunk_reply(cookie, offset, data) if structured else
                     simple_reply(cookie, data=data))
            pos += HEADER.size
        else:
            special = offset == FULL_AT
            if not special:
                d.data[offset:offset + length] = stream[pos + HEADER.size:
                                                        pos + HEADER.size + length]
            parts = slow_reply(kind, cookie, offset, length) if special else simple_reply(cookie)
            pos += HEADER.size + length
        if special:
            slow.append((kind, cookie, offset, length))
            stopped = stop_on_slow
        out += b"".join(parts)
    return bytes(out), slow, pos, True


def check(data: bytes) -> None:
    if len(data) < 4:
        return
    d = disk()
    b0, b1, seed, b3 = data[:4]
    stream = data[4:]
    structured, writable, locked, stop_on_slow = (bool(b0 & bit) for bit in (1, 2, 64, 128))
    plain = PlainRequests(SIZES[b0 >> 2 & 3], writable, MAX_LENGTHS[b0 >> 4 & 3])
    room = HEADER.size + plain.max_length
    cap = room + (0, 1, 100, max(0, 256 * 1024 - room))[b1 & 3]
    initial = stream[:min((b1 >> 4) * 11, cap)]
    start = min(b3 * 3, cap - len(initial))
    rest = stream[len(initial):]

    stop = StopFlag()
    slow_calls: list[tuple[int, int, int, int]] = []

    def slow(cmd: int, cookie: int, offset: int, count: int,
             res: Any) -> list[bytes | memoryview]:
        slow_calls.append((cmd, cookie, offset, count))
        if stop_on_slow:
            stop.set()
        return slow_reply(cmd, cookie, offset, count)

    call, pread, pwrite, api2 = d.calls
    lock = threading.Lock() if locked else None
    client, server = socket.socketpair()
    loop = CompiledLoop(fd=server.fileno(), plain=plain, structured=structured, call=call,
                        pread=pread, pwrite=pwrite if writable else None, handle=d.handle,
                        api2=api2, lock=lock, stop=stop, slow=slow,
                        max_batch=BATCHES[b1 >> 2 & 3])
    buf = bytearray(cap)
    buf[start:start + len(initial)] = initial
    result: list[Any] = []

    def serve() -> None:
        try:
            result.append(_fastpath.serve(loop, buf, start, start + len(initial), None))
        except Exception as err:  # reported below
            result.append(err)
        server.shutdown(socket.SHUT_RDWR)

    def send() -> None:
        try:
            for piece in chunks(rest, seed):
                client.sendall(piece)
            client.shutdown(socket.SHUT_WR)
        except OSError:  # serve() returned before it read everything
            pass

    client.settimeout(30)
    threads = [threading.Thread(target=serve, daemon=True),
               threading.Thread(target=send, daemon=True)]
    for t in threads:
        t.start()
    got = bytearray()
    try:
        while chunk := client.recv(1 << 16):
            got += chunk
    except TimeoutError as err:
        raise Finding("serve() neither replied nor returned within 30 s") from err
    for t in threads:
        t.join(30)
        expect(not t.is_alive(), "serve() did not return")
    client.close()
    server.close()

    expect(len(result) == 1 and isinstance(result[0], tuple), f"serve() raised {result}")
    pos, end, eof = result[0]
    want, want_slow, want_pos, want_eof = reference(d, plain, structured, stop_on_slow,
                                                    initial + rest)
    expect(bytes(got) == want, f"replies differ: got {len(got)} bytes, want {len(want)}; "
                               f"first difference at {first_difference(got, want)}")
    expect(slow_calls == want_slow, f"slow calls {slow_calls}, want {want_slow}")
    expect(eof == want_eof, f"eof {eof}, want {want_eof}")
    expect(0 <= pos <= end <= cap, f"positions {pos}, {end} outside the buffer of {cap}")
    # What is left in the buffer is the stream from where the loop handed back.
    whole = initial + rest
    left = bytes(buf[pos:end])
    expect(whole[want_pos:want_pos + len(left)] == left,
           f"the buffer's [{pos}, {end}) is not the stream from {want_pos}")
    if eof:
        expect(len(left) == len(whole) - want_pos, "bytes lost before EOF")
    expect(lock is None or not lock.locked(), "the request lock is still held")


def first_difference(a: bytes | bytearray, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def seeds() -> dict[str, bytes]:
    """The seed corpus (fuzz/corpus/fastpath/): ``--seeds DIR`` writes it."""
    def req(kind: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
        return HEADER.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)

    def wr(cookie: int, offset: int, payload: bytes) -> bytes:
        return req(Cmd.WRITE, cookie, offset, len(payload)) + payload

    mixed = (wr(1, 0, b"A" * 512) + req(Cmd.READ, 2, 0, 512) + wr(3, 4090, bytes(range(12)))
             + req(Cmd.READ, 4, 4088, 16) + req(Cmd.READ, 5, SIZE - 7, 7))
    special = (req(Cmd.READ, 1, ERROR_AT, 8) + req(Cmd.READ, 2, 0, 8)
               + req(Cmd.READ, 3, NUMBER_AT, 8) + req(Cmd.READ, 4, SHORT_AT, 16)
               + wr(5, FULL_AT, b"full") + req(Cmd.READ, 6, 8, 8))
    edges = (req(Cmd.READ, 1, SIZE - 1, 1) + req(Cmd.READ, 2, SIZE, 1)
             + req(Cmd.READ, 3, (1 << 64) - 1, 2) + req(Cmd.READ, 4, 0, 0))
    iov_max = b"".join(req(Cmd.READ, 8 * i + 7, ERROR_AT, 8) for i in range(130))
    many = b"".join(wr(2 * i, i * 700, bytes([i]) * 300) + req(Cmd.READ, 2 * i + 1, i * 700, 300)
                    for i in range(40))
    return {
        "mixed-simple": bytes([0x02, 0x30, 0, 0]) + mixed,
        "mixed-structured-locked": bytes([0x43, 0x51, 3, 5]) + mixed,
        "special-stop": bytes([0x83, 0x00, 0, 0]) + special,
        "special-readonly": bytes([0x01, 0x02, 7, 0]) + special,
        "edges-small-buffer": bytes([0x22, 0x24, 1, 9]) + edges,
        "flags-and-other-commands": bytes([0x02, 0x03, 0, 0]) + req(Cmd.READ, 1, 0, 8)
        + req(Cmd.READ, 2, 0, 8, flags=1) + req(Cmd.FLUSH, 3, 0, 0) + req(Cmd.READ, 4, 0, 8),
        "partial-write-at-eof": bytes([0x02, 0x00, 2, 0]) + req(Cmd.READ, 1, 0, 4)
        + req(Cmd.WRITE, 2, 0, 100) + b"x" * 50,
        "bad-magic": bytes([0x02, 0x00, 0, 0]) + req(Cmd.READ, 1, 0, 4) + b"\0" * 28,
        "many-batches": bytes([0x12, 0x0e, 0, 0]) + many,
        "slow-iov-max": bytes([0x02, 0x03, 0, 0]) + iov_max,
        "max-length-4k": bytes([0x16, 0x01, 5, 0]) + req(Cmd.READ, 1, 0, PAGE)
        + req(Cmd.READ, 2, 0, PAGE + 1) + wr(3, 0, b"q" * PAGE),
    }


def replay(paths: list[str]) -> int:
    """Each file once (a directory: each file in it), without atheris: for leak checks and
    for replaying a finding where atheris is not wanted."""
    files = [p for arg in paths for p in (sorted(Path(arg).iterdir()) if Path(arg).is_dir()
                                          else [Path(arg)])]
    for path in files:
        check(path.read_bytes())
    print(f"fastpath: replayed {len(files)} inputs, no findings")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seeds"]:
        for name, seed in seeds().items():
            (Path(sys.argv[2]) / name).write_bytes(seed)
        sys.exit(0)
    if "--replay" in sys.argv:
        sys.exit(replay([a for a in sys.argv[1:] if a != "--replay"]))
    if os.environ.get("LUANBD_FUZZ_INSTRUMENT_HARNESS", "1") != "0":
        import atheris  # type: ignore[import-untyped]

        check = atheris.instrument_func(check)
        reference = atheris.instrument_func(reference)
    fuzzlib.main(check)
