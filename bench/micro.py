#!/usr/bin/env python3
"""Micro-benchmark of luanbd's request path without sockets: parse + Lua call + reply encode.

    .venv/bin/python bench/micro.py                  # Lua 5.4 and LuaJIT, ~1 min
    .venv/bin/python bench/micro.py --lua 5.4 --only read-4k,handle-read-4k
    PYTHONPATH=/elsewhere/src .venv/bin/python bench/micro.py   # another checkout's luanbd

It loads the shared harness's ``ram.lua`` (the script run-bench serves) into a
``LuaPlugin``, opens a ``BackendContext`` on it, fills the disk, and times batches of
requests handed to the sans-IO pieces the server uses: ``RequestParser.receive_data`` of a
batch of request bytes, then per request ``next_request``, ``validate_request``, the
context's ``pread``/``pwrite`` (one Lua call under the request lock) and the reply encoder.
The ``handle-*`` rows call ``RequestHandler.handle_request`` instead of the last three, and
the ``loop-*`` rows run ``Connection._transmission`` on a fake socket whose ``recv_into`` hands
out the batches and whose ``sendmsg`` swallows the replies: the whole request loop, minus
system calls.  A row whose luanbd internals changed shape is skipped with the reason.

Each row: microseconds per request, best of 5 timed repeats after a warm-up (the median of
the 5 in brackets shows the noise); the repeats go round all rows in turn.  The ``stage:*``
rows split the 4 KiB read into its parts.
No socket, no kernel, no client: these are floors for the server's Python cost per request
(run-bench's srv-us/op adds system calls and wake-ups).  A tool for a person, not a test:
compare rows of one run, or the same row before and after a change, on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from luanbd.backend.chain import Chain
from luanbd.backend.context import BackendContext
from luanbd.lua.plugin import LuaPlugin
from luanbd.protocol import replies
from luanbd.protocol.constants import REQUEST_HEADER, REQUEST_MAGIC, Cmd
from luanbd.protocol.handshake import NEED_DATA
from luanbd.protocol.transmission import RequestParser, Session, validate_request

REPO = Path(__file__).resolve().parent.parent
KIB, MIB = 1024, 1024 * 1024
#: The parser's receive chunk in the server (connection.RECV_SIZE).
RECV_SIZE = 256 * KIB


def find_ram_lua(given: str | None) -> str:
    candidates = [given] if given else [str(REPO.parent / "shared" / "bench" / "ram.lua")]
    env = os.environ.get("LUANBD_SHARED_BENCH")
    if env and not given:
        candidates.append(os.path.join(env if os.path.isdir(env) else os.path.dirname(env),
                                       "ram.lua"))
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    sys.exit(f"micro.py: ram.lua not found (tried {', '.join(map(str, candidates))}); "
             "pass --script or set LUANBD_SHARED_BENCH")


class Bench:
    """One Lua state serving ram.lua through a BackendContext, and the request batches."""

    def __init__(self, script: str, lua: str, size: int, batch: int, seed: int = 1) -> None:
        self.plugin = LuaPlugin(script, lua=lua)
        self.plugin.load()
        self.plugin.config("size", str(size))
        self.plugin.config_complete()
        self.plugin.get_ready()
        self.lock = threading.Lock()
        self.ctx = BackendContext(Chain(self.plugin).connect(), self.lock, readonly=False,
                                  thread_model=self.plugin.thread_model)
        caps = self.ctx.open()
        # As fio/nbdcopy negotiate it through libnbd: structured replies on.
        self.session = Session(b"", caps.size, caps.flags, True, None)
        self.size = caps.size
        self.batch = batch
        self.rng = random.Random(seed)
        # Fill the disk so that reads return stored pages, as after run-bench's prefill.
        block = bytes(range(256)) * (MIB // 256)
        for off in range(0, size, MIB):
            self.ctx.pwrite(block[: min(MIB, size - off)], off, False)

    def header(self, cmd: Cmd, cookie: int, offset: int, length: int) -> bytes:
        return REQUEST_HEADER.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length)

    def batches(self, cmd: Cmd, length: int, count: int, per_batch: int,
                sequential: bool = False) -> list[bytes]:
        """``count`` different batches of ``per_batch`` requests (bytes as sent)."""
        payload = os.urandom(length) if cmd is Cmd.WRITE else b""
        slots = self.size // length
        out, seq = [], 0
        for _ in range(count):
            parts = []
            for i in range(per_batch):
                if sequential:
                    slot, seq = seq % slots, seq + 1
                else:
                    slot = self.rng.randrange(slots)
                parts.append(self.header(cmd, i + 1, slot * length, length) + payload)
            out.append(b"".join(parts))
        return out


def calibrate(fn: Callable[[int], object], target: float) -> int:
    """Warm ``fn`` up and return the n for which ``fn(n)`` takes about ``target`` seconds."""
    n = 1
    while True:
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        if dt >= target / 4:
            return max(1, round(n * target / dt))
        n *= 2


def timed(fn: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- variants

def parse_read_reply(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    """receive_data of a batch, then next_request, validate_request, ctx.pread,
    read_chunk_reply for each request (the server's READ path without I/O)."""
    ctx, session = b.ctx, b.session
    parser = RequestParser(b"", RECV_SIZE)
    pread, reply = ctx.pread, replies.read_chunk_reply
    k = len(data)

    def run(n: int) -> None:
        for i in range(n):
            parser.receive_data(data[i % k])
            out: list[Any] = []
            while True:
                req = parser.next_request()
                if req is NEED_DATA:
                    break
                validate_request(req, session)
                out += reply(req.cookie, req.offset, pread(req.length, req.offset))
    return run


def parse_write_reply(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    """The same for WRITE: ctx.pwrite of the payload, then a simple reply."""
    ctx, session = b.ctx, b.session
    parser = RequestParser(b"", RECV_SIZE)
    pwrite, reply = ctx.pwrite, replies.simple_reply
    k = len(data)

    def run(n: int) -> None:
        for i in range(n):
            parser.receive_data(data[i % k])
            out: list[Any] = []
            while True:
                req = parser.next_request()
                if req is NEED_DATA:
                    break
                validate_request(req, session)
                pwrite(req.data, req.offset, False)
                out += reply(req.cookie)
    return run


def make_connection(b: Bench) -> Any:
    """A Connection whose export is open on ``b.ctx``, with a stand-in Service; no socket."""
    from luanbd.backend.locks import Locks
    from luanbd.config import ServerConfig
    from luanbd.server.connection import Connection

    # These rows time the Python loop (the reference, and the path of every request the
    # compiled loop hands back); the compiled loop needs a real socket: run-bench times it.
    chain = Chain(b.plugin)
    locks = Locks(chain.thread_model)
    service = types.SimpleNamespace(chain=chain, locks=locks, stopping=False,
                                    config=ServerConfig(script="", fastpath=False))
    conn = Connection(service, None, 1, "")  # type: ignore[arg-type]
    conn.lock = b.lock
    conn.negotiation = types.SimpleNamespace(ctx=b.ctx)  # type: ignore[assignment]
    return conn


def parse_handle(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    """receive_data + next_request, then RequestHandler.handle_request (validate, call,
    reply)."""
    from luanbd.server.requests import RequestHandler, StopFlag

    handle = RequestHandler(b.ctx, b.session, 1, StopFlag()).handle_request
    parser = RequestParser(b"", RECV_SIZE)
    k = len(data)

    def run(n: int) -> None:
        for i in range(n):
            parser.receive_data(data[i % k])
            out: list[Any] = []
            while True:
                req = parser.next_request()
                if req is NEED_DATA:
                    break
                out += handle(req)
    return run


class FakeSocket:
    """recv_into hands out ``left`` batches (cycling through ``data``), then EOF;
    sendmsg/sendall swallow the replies."""

    def __init__(self, data: list[bytes]) -> None:
        self.data = data
        self.left = 0
        self.i = 0
        self.pending = memoryview(b"")

    def recv_into(self, buf: Any, nbytes: int = 0, flags: int = 0) -> int:
        if not self.pending:
            if self.left == 0:
                return 0
            self.left -= 1
            self.pending = memoryview(self.data[self.i % len(self.data)])
            self.i += 1
        n = min(len(buf), len(self.pending), nbytes or len(buf))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def sendmsg(self, buffers: list[Any], *args: object) -> int:
        return sum(len(x) for x in buffers)

    def sendall(self, data: Any, *args: object) -> None:
        pass

    def send(self, data: Any, *args: object) -> int:
        return len(data)

    def settimeout(self, value: float | None) -> None:
        pass

    def gettimeout(self) -> float | None:
        return None

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


def transmission_loop(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    """Connection._transmission on a FakeSocket: the whole request loop, no system calls."""
    from luanbd.server.transport import ClientGone

    conn = make_connection(b)
    sock = FakeSocket(data)
    conn.sock = sock

    def run(n: int) -> None:
        sock.left = n
        try:
            conn._transmission(b.session, b"")
        except ClientGone:
            return
        raise RuntimeError("_transmission returned before EOF")
    return run


def stage_parse(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    parser = RequestParser(b"", RECV_SIZE)
    k = len(data)

    def run(n: int) -> None:
        for i in range(n):
            parser.receive_data(data[i % k])
            while parser.next_request() is not NEED_DATA:
                pass
    return run


def parsed(data: list[bytes]) -> list[list[Any]]:
    """The requests of each batch, parsed once (for the stages after parsing)."""
    out = []
    for chunk in data:
        parser = RequestParser(chunk, RECV_SIZE)
        reqs = []
        while (req := parser.next_request()) is not NEED_DATA:
            reqs.append(req)
        out.append(reqs)
    return out


def stage_validate(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    batches, session = parsed(data), b.session
    k = len(batches)

    def run(n: int) -> None:
        for i in range(n):
            for req in batches[i % k]:
                validate_request(req, session)
    return run


def stage_pread(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    batches = [[(r.length, r.offset) for r in reqs] for reqs in parsed(data)]
    pread = b.ctx.pread
    k = len(batches)

    def run(n: int) -> None:
        for i in range(n):
            for length, offset in batches[i % k]:
                pread(length, offset)
    return run


def stage_lua_call(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    """The raw lupa call of the script's pread, no luanbd wrapper (nor the request lock)."""
    batches = [[(r.length, r.offset) for r in reqs] for reqs in parsed(data)]
    fn, h = b.plugin.g.pread, b.ctx.top.handle
    k = len(batches)

    def run(n: int) -> None:
        for i in range(n):
            for length, offset in batches[i % k]:
                fn(h, length, offset, 0)
    return run


def stage_reply(b: Bench, data: list[bytes]) -> Callable[[int], object]:
    page = bytes(4096)
    reply = replies.read_chunk_reply
    batch = b.batch

    def run(n: int) -> None:
        for _ in range(n):
            out: list[Any] = []
            for i in range(batch):
                out += reply(i, i * 4096, page)
    return run


# (name, what, maker, command, request length, requests per batch, sequential offsets)
VARIANTS: list[tuple[str, str, Callable[..., Callable[[int], object]], Cmd, int, int, bool]] = [
    ("read-4k", "parse+validate+pread+read_chunk_reply", parse_read_reply, Cmd.READ, 4 * KIB,
     16, False),
    ("write-4k", "parse+validate+pwrite+simple_reply", parse_write_reply, Cmd.WRITE, 4 * KIB,
     16, False),
    ("read-1m", "as read-4k, 1 MiB sequential", parse_read_reply, Cmd.READ, MIB, 4, True),
    ("write-1m", "as write-4k, 1 MiB sequential", parse_write_reply, Cmd.WRITE, MIB, 4, True),
    ("handle-read-4k", "parse + RequestHandler.handle_request", parse_handle, Cmd.READ,
     4 * KIB, 16, False),
    ("handle-write-4k", "parse + RequestHandler.handle_request", parse_handle, Cmd.WRITE,
     4 * KIB, 16, False),
    ("loop-read-4k", "Connection._transmission, fake socket", transmission_loop, Cmd.READ,
     4 * KIB, 16, False),
    ("loop-write-4k", "Connection._transmission, fake socket", transmission_loop, Cmd.WRITE,
     4 * KIB, 16, False),
    ("stage:parse", "receive_data+next_request (4k READ)", stage_parse, Cmd.READ, 4 * KIB, 16,
     False),
    ("stage:validate", "validate_request", stage_validate, Cmd.READ, 4 * KIB, 16, False),
    ("stage:pread", "ctx.pread: lock + LuaPlugin + Lua", stage_pread, Cmd.READ, 4 * KIB, 16,
     False),
    ("stage:lua-call", "lupa call of ram.lua's pread alone", stage_lua_call, Cmd.READ, 4 * KIB,
     16, False),
    ("stage:reply", "read_chunk_reply", stage_reply, Cmd.READ, 4 * KIB, 16, False),
]


def code_state() -> str:
    import luanbd

    where = Path(luanbd.__file__).resolve().parent
    out = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False)
    return f"{where} ({out.stdout.strip() or 'not a git checkout'})"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lua", default="5.4,luajit",
                   help="comma-separated Lua runtimes (default 5.4,luajit)")
    p.add_argument("--only", metavar="LIST", help="comma-separated rows to run (default all)")
    p.add_argument("--size", type=int, default=64, metavar="MIB",
                   help="disk size in MiB (default 64; reads and writes spread over it)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (default 5)")
    p.add_argument("--time", type=float, default=0.2, metavar="S",
                   help="seconds per timed repeat (default 0.2)")
    p.add_argument("--script", help="ram.lua to load (default ../shared/bench/ram.lua)")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, what, *_ in VARIANTS:
            print(f"{name:<16} {what}")
        return 0
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := only - {v[0] for v in VARIANTS}):
        p.error(f"unknown rows: {', '.join(sorted(unknown))} (see --list)")
    script = find_ram_lua(args.script)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"luanbd request path without sockets: Python {platform.python_version()}, "
          f"luanbd from {code_state()}")
    print(f"script {script}, disk {args.size} MiB, best (median) of {args.repeats} x "
          f"~{args.time:g} s; load average {load:.2f} on {os.cpu_count()} CPUs")
    for lua in args.lua.split(","):
        bench = Bench(script, lua, args.size * MIB, 16)
        print(f"\n--lua={lua} ({bench.plugin.lua_version})")
        print(f"{'row':<16} {'us/request':>10} {'(median)':>9} {'req/batch':>9}  what")
        rows = []
        for name, what, maker, cmd, length, per_batch, seq in VARIANTS:
            if only and name not in only:
                continue
            bench.batch = per_batch
            data = bench.batches(cmd, length, 8 if length >= MIB else 64, per_batch, seq)
            try:
                fn = maker(bench, data)
                fn(1)  # fails here if luanbd's internals changed shape
            except Exception as err:
                rows.append((name, what, per_batch, None, 0, f"{type(err).__name__}: {err}"))
                continue
            rows.append((name, what, per_batch, fn, calibrate(fn, args.time), ""))
        # Repeats go round the rows, so that a passing disturbance (another process, a
        # GC or page-reclaim burst) spoils one repeat of several rows, not a whole row.
        times: dict[str, list[float]] = {r[0]: [] for r in rows}
        for _ in range(args.repeats):
            for name, _, _, fn, n, _ in rows:
                if fn is not None:
                    times[name].append(timed(fn, n))
        for name, what, per_batch, fn, n, why in rows:
            if fn is None:
                print(f"{name:<16} {'skipped':>10} {'':>9} {'':>9}  {what}: {why}")
                continue
            per = n * per_batch / 1e6
            best, median = min(times[name]) / per, statistics.median(times[name]) / per
            print(f"{name:<16} {best:>10.2f} {f'({median:.2f})':>9} {per_batch:>9}  {what}")
        bench.ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
