"""Reliability (issue 5): buggy plugins, I/O faults and shutdown, each with a real luanbd
process and real clients.

* A stop signal while clients write: luanbd exits 0, later requests get ESHUTDOWN, the
  script's ``close``/``cleanup``/``unload`` run, and every acknowledged write is on disk
  when luanbd is started again on the same file.
* A full disk and a failing device reach the client as ENOSPC and EIO.
* An error (or a wrong return type) in each callback: a clean handshake error or a failed
  request, one ``luanbd: error:`` line naming the callback, and the next client is served.
  (pread, pwrite, flush, trim, zero and close errors, and can_write/can_flush/can_trim/
  is_rotational wrong types are covered by test_robustness.py and test_differential.py;
  config and config_complete by test_startup_errors.py.)
* ``coroutine.yield`` outside a coroutine, coroutines used properly, and a callback that
  runs out of memory (under an address-space limit set with prlimit).

Bugs these tests found, all fixed: an error object whose ``__tostring`` raises escaped the call
wrapper (dropped connections, a client left hanging, Python tracebacks), and a WRITE bigger
than the room left under ``--lua-memory-limit`` aborted the whole server ("PANIC: unprotected
error in call to Lua API": lupa, like nbdkit's Lua plugin, copies arguments into Lua outside a
protected call; luanbd now refuses such a payload with ENOMEM before copying it).
"""

from __future__ import annotations

import contextlib
import errno
import resource
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from luanbd_procs import (
    CMD_DISC,
    LUANBD,
    RawClient,
    Server,
    StartServer,
    assert_no_traceback,
    client_env,
    line_of,
    not_sanitized,
    run_client,
    run_luanbd,
    script,
    where,
)

FAULTY = script("faulty.lua")
FILEDISK = script("filedisk.lua")
COROUTINES = script("coroutines.lua")
FILE_EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "file.lua")

KiB = 1024
MiB = 1024 * KiB
#: The line of faulty.lua that raises every injected error.
FAULTY_LINE = line_of(FAULTY, 'error(name .. " failed on purpose")')


def connect(server: Server, export: str = "", **kw: Any) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    for key, value in kw.items():
        getattr(h, f"set_{key}")(value)
    assert server.sock is not None
    h.connect_unix(str(server.sock))
    return h


def injected(cb: str) -> str:
    """The log line of faulty.lua's error() in callback ``cb``."""
    return f"luanbd: error: {cb}: {where(FAULTY, FAULTY_LINE)}: {cb} failed on purpose"


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def first_connection(server: Server) -> nbd.NBD:
    """connect() as soon as the server listens (no readiness probe before it)."""
    assert server.sock is not None
    deadline = time.monotonic() + 15
    while True:
        try:
            return connect(server)
        except nbd.Error as err:
            # Not bound yet (ENOENT) or bound but not listening (ECONNREFUSED).
            if ": connect: " not in str(err) or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


@contextlib.contextmanager
def own_server(workdir: Path, *argv: str) -> Iterator[Server]:
    """``luanbd -f -U SOCK ARGV``, stopped here rather than by start_server's teardown,
    whose checks (exit status 0, no traceback) would turn an expected failure of an xfail
    test into a test error."""
    sock = workdir / "own.sock"
    server = Server(workdir, ["-f", "-U", str(sock), *argv], sock=sock)
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def try_call(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or the errno name of the nbd.Error it raised."""
    try:
        return fn()
    except nbd.Error as err:
        return err.errno


def second_client_works(server: Server, export: str = "") -> None:
    """A new connection reads and writes as if nothing had happened."""
    h = connect(server, export)
    h.pwrite(b"second client" * 40, 4096)
    assert h.pread(520, 4096) == b"second client" * 40
    h.shutdown()


# === 1. A stop signal while clients write =====================================================

BLOCK = 4 * KiB
WRITERS = 4
#: Each writer owns this many BLOCK-sized slots and writes each slot at most once, so an
#: acknowledged write has exactly one possible content.
SLOTS = 4096
DEPTH = 8
#: The signal is sent once this many writes were acknowledged (all writers together).
ACKS_BEFORE_SIGNAL = 1500


def slot_data(writer: int, slot: int) -> bytes:
    head = struct.pack(">4sII", b"ack!", writer, slot)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


class Writer(threading.Thread):
    """One libnbd connection with DEPTH writes in flight, each to a fresh slot, until a
    write fails.  Records which writes the server acknowledged and which it refused."""

    def __init__(self, uri: str, number: int) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.uri = uri
        self.number = number
        self.acked: list[int] = []
        #: errno -> slots whose write failed with it.
        self.failed: dict[int, list[int]] = {}
        #: Slots in flight when the connection broke: their outcome is unknown.
        self.unknown: list[int] = []
        self.broken: str | None = None
        #: Anything else that went wrong in this thread (the test reports it).
        self.exception: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._write()
        except BaseException as err:  # reported by the test
            self.exception = err

    def _write(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        in_flight: dict[int, tuple[int, nbd.Buffer]] = {}
        next_slot = self.number * SLOTS
        end = next_slot + SLOTS
        issuing = True
        try:
            while True:
                while issuing and len(in_flight) < DEPTH and next_slot < end:
                    buf = nbd.Buffer.from_bytearray(bytearray(slot_data(self.number,
                                                                        next_slot)))
                    cookie = h.aio_pwrite(buf, next_slot * BLOCK)
                    in_flight[cookie] = (next_slot, buf)
                    next_slot += 1
                if not in_flight:
                    break
                h.poll(-1)
                for cookie in list(in_flight):
                    try:
                        done = h.aio_command_completed(cookie)
                    except nbd.Error as err:
                        self.failed.setdefault(err.errnum or -1, []).append(
                            in_flight.pop(cookie)[0])
                        issuing = False
                        continue
                    if done:
                        self.acked.append(in_flight.pop(cookie)[0])
                if self.stop.is_set():
                    issuing = False
        except nbd.Error as err:
            self.broken = str(err)
            self.unknown = [slot for slot, _ in in_flight.values()]
        try:
            h.shutdown()
        except nbd.Error:
            pass


def read_disk(server: Server, size: int) -> bytes:
    h = connect(server)
    chunks = [bytes(h.pread(min(4 * MiB, size - off), off)) for off in range(0, size, 4 * MiB)]
    h.shutdown()
    return b"".join(chunks)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "plugin"), [
    (signal.SIGTERM, "filedisk"),
    (signal.SIGINT, "filedisk"),
    (signal.SIGTERM, "examples/file.lua"),
], ids=["SIGTERM-filedisk", "SIGINT-filedisk", "SIGTERM-examples-file"])
def test_stop_signal_while_clients_write(start_server: StartServer, workdir: Path,
                                         sig: int, plugin: str) -> None:
    disk = workdir / "disk.img"
    size = WRITERS * SLOTS * BLOCK
    with open(disk, "wb") as f:
        f.truncate(size)
    calls = workdir / "calls.log"
    if plugin == "filedisk":
        server = start_server(FILEDISK, f"file={disk}", f"log={calls}")
    else:
        server = start_server(FILE_EXAMPLE, f"file={disk}")
    writers = [Writer(server.uri, n) for n in range(WRITERS)]
    for w in writers:
        w.start()
    try:
        wait_for(lambda: sum(len(w.acked) for w in writers) >= ACKS_BEFORE_SIGNAL,
                 f"{ACKS_BEFORE_SIGNAL} acknowledged writes")
        assert all(w.is_alive() for w in writers), "a writer ran out of slots or failed"
        server.proc.send_signal(sig)
        for w in writers:
            w.join(20)
    finally:
        for w in writers:
            w.stop.set()
    assert not any(w.is_alive() for w in writers)
    assert [w.exception for w in writers] == [None] * WRITERS
    status = server.proc.wait(20)
    assert status == 0, server.log()
    assert server.stop() == 0
    assert server.errors() == []
    assert_no_traceback(server.log())

    # After the signal, requests got ESHUTDOWN (as nbdkit): every writer saw it, no write
    # failed any other way, and none was cut off with requests in flight.
    for w in writers:
        assert set(w.failed) == {errno.ESHUTDOWN}, (w.number, w.failed, w.broken)
        assert w.broken is None and w.unknown == []
    # The server is gone: nobody is listening any more.
    assert server.sock is not None
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.sock))

    if plugin == "filedisk":
        # Every connection's handle was closed, then cleanup and unload ran once, last.
        lines = read_lines(calls)
        assert lines[-2:] == ["cleanup", "unload"], lines
        assert lines.count("open") == lines.count("close") == WRITERS, lines
        assert lines.count("cleanup") == lines.count("unload") == 1

    # Start again on the same file (the seed API example, read-only): every acknowledged
    # write reads back exactly, and every write refused with ESHUTDOWN never happened.
    # (examples/file.lua writes through a buffered Lua file: its acknowledged writes reach
    # the file only if luanbd's exit flushes the C streams.)
    again = start_server(FILE_EXAMPLE, f"file={disk}", options=["-r"])
    data = read_disk(again, size)
    acked = refused = 0
    for w in writers:
        for slot in w.acked:
            assert data[slot * BLOCK:(slot + 1) * BLOCK] == slot_data(w.number, slot), slot
            acked += 1
        for slot in w.failed.get(errno.ESHUTDOWN, []):
            assert data[slot * BLOCK:(slot + 1) * BLOCK] == bytes(BLOCK), slot
            refused += 1
    # Nothing was written anywhere else.
    written = {s for w in writers for s in w.acked}
    stray = [s for s in range(WRITERS * SLOTS)
             if s not in written and data[s * BLOCK:(s + 1) * BLOCK] != bytes(BLOCK)]
    assert stray == []
    assert acked >= ACKS_BEFORE_SIGNAL
    assert refused >= WRITERS
    print(f"{acked} acknowledged writes checked, {refused} ESHUTDOWN writes absent "
          f"({signal.Signals(sig).name}, {plugin})")


@pytest.mark.timeout(60)
def test_stop_signal_with_a_client_that_stays(start_server: StartServer,
                                              workdir: Path) -> None:
    # A client that ignores the shutdown and keeps its connection open is cut off after
    # the grace period; its handle is still closed and cleanup/unload still run.
    disk = workdir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(MiB)
    calls = workdir / "calls.log"
    server = start_server(FILEDISK, f"file={disk}", f"log={calls}")
    h = connect(server)
    h.pwrite(b"stays" * 100, 8192)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    # The signal is handled asynchronously: requests work until it is.
    outcome = None
    while time.monotonic() - start < 2 and not isinstance(outcome, str):
        outcome = try_call(lambda: h.pread(512, 0))
        time.sleep(0.01)
    assert outcome == "ESHUTDOWN"
    assert server.proc.wait(20) == 0
    elapsed = time.monotonic() - start
    assert 1.0 < elapsed < 15, elapsed  # the grace period (3 s), not forever
    assert server.errors() == []
    assert_no_traceback(server.log())
    assert read_lines(calls) == ["open", "close", "cleanup", "unload"]
    # The client finds the connection gone.
    assert try_call(lambda: h.pread(512, 0)) is not None
    assert h.aio_is_closed() or h.aio_is_dead()
    with open(disk, "rb") as f:
        f.seek(8192)
        assert f.read(500) == b"stays" * 100


# === 2. Full disk and failing device ==========================================================

@pytest.mark.timeout(60)
def test_dev_full_gives_enospc(start_server: StartServer) -> None:
    # /dev/full reads as zeroes and every write fails with ENOSPC.
    server = start_server(FILEDISK, "file=/dev/full", "size=1M")
    h = connect(server)
    assert try_call(lambda: h.pwrite(b"x" * 4096, 0)) == "ENOSPC"
    assert try_call(lambda: h.pwrite(b"y" * 512, 512, nbd.CMD_FLAG_FUA)) == "ENOSPC"
    # WRITE_ZEROES is emulated with pwrite (there is no zero callback): ENOSPC too.
    assert try_call(lambda: h.zero(4096, 8192)) == "ENOSPC"
    assert h.pread(8, 0) == bytes(8)
    h.flush()
    h.shutdown()
    assert server.errors() == [
        "luanbd: error: pwrite: write at 0: No space left on device",
        "luanbd: error: pwrite: write at 512: No space left on device",
        "luanbd: error: pwrite: write at 8192: No space left on device",
    ]
    second = connect(server)
    assert second.pread(4, 4096) == bytes(4)


@pytest.fixture
def tiny_tmpfs(workdir: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root and the permission to mount)."""
    mnt = workdir / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.timeout(60)
def test_full_filesystem_gives_enospc(start_server: StartServer, tiny_tmpfs: Path) -> None:
    # A 4 MiB sparse file on a 1 MiB filesystem: writing it fills the filesystem.
    disk = tiny_tmpfs / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    server = start_server(FILEDISK, f"file={disk}")
    h = connect(server)
    chunk = 64 * KiB
    written = 0
    outcome = None
    for off in range(0, 4 * MiB, chunk):
        outcome = try_call(lambda off=off: h.pwrite(bytes([off // chunk + 1]) * chunk, off))
        if outcome is not None:
            break
        written += chunk
    assert outcome == "ENOSPC"
    assert written == MiB  # tmpfs counts whole pages: exactly its size fits
    # What was acknowledged is there; the server and this connection go on.
    for off in range(0, written, chunk):
        assert h.pread(chunk, off) == bytes([off // chunk + 1]) * chunk
    assert h.pread(chunk, 3 * MiB) == bytes(chunk)
    h.pwrite(b"rewrite" * 100, 100)  # allocated blocks can still be rewritten
    assert h.pread(700, 100) == b"rewrite" * 100
    assert try_call(lambda: h.pwrite(b"z" * chunk, 3 * MiB)) == "ENOSPC"
    h.flush()
    h.shutdown()
    assert server.errors() == [
        f"luanbd: error: pwrite: write at {MiB}: No space left on device",
        f"luanbd: error: pwrite: write at {3 * MiB}: No space left on device",
    ]
    # The file itself holds the acknowledged data.
    with open(disk, "rb") as f:
        assert f.read(2 * chunk) == b"\x01" * 100 + b"rewrite" * 100 + b"\x01" * (
            chunk - 800) + b"\x02" * chunk


FAILING_READS = {
    # luanbd reading its own /proc/self/mem below vm.mmap_min_addr (64 KiB), where nothing
    # is mapped: the kernel's read() fails with EIO.
    "device-eio": (["file=/proc/self/mem", "size=64K", "readonly=1"], "EIO",
                   "pread: read at {off}: Input/output error"),
    # A directory opens, but read() fails with EISDIR, an errno NBD has no code for.
    "directory-eisdir": (["file={workdir}", "size=64K", "readonly=1"], "EINVAL",
                         "pread: read at {off}: Is a directory"),
    # A closed Lua file: Lua raises an error without errno (at pread's seek).
    "closed-file": (["file={disk}", "closed=1"], "EIO",
                    "pread: {where}: attempt to use a closed file"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(FAILING_READS))
def test_failing_reads_reach_the_client(start_server: StartServer, workdir: Path,
                                        case: str) -> None:
    params, client_errno, message = FAILING_READS[case]
    disk = workdir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 * KiB)
    args = [p.format(workdir=workdir, disk=disk) for p in params]
    server = start_server(FILEDISK, *args, options=["-r"])
    h = connect(server)
    for off in (0, 4096):
        assert try_call(lambda off=off: h.pread(512, off)) == client_errno
    h.shutdown()
    seek_line = line_of(FILEDISK, "local ok, msg, errno = fh:seek(\"set\", offset)  -- pread")
    assert server.errors() == [
        f"luanbd: error: {message.format(off=off, where=where(FILEDISK, seek_line))}"
        for off in (0, 4096)]
    # The server goes on: a later client still gets the size.
    assert run_client(["nbdinfo", "--size", server.uri]).stdout == "65536\n"


# === 3. open and get_size failures: a clean handshake error ===================================

OPEN_FAILURES = {
    "open-raises": ("fail=open", injected("open")),
    "get_size-raises": ("fail=get_size", injected("get_size")),
    "get_size-wrong-type": (
        "bad=get_size", "luanbd: error: get_size: cannot convert returned value to an integer"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(OPEN_FAILURES))
def test_open_failure_is_a_clean_handshake_error(start_server: StartServer, workdir: Path,
                                                 case: str) -> None:
    param, line = OPEN_FAILURES[case]
    calls = workdir / "calls.log"
    server = start_server(FAULTY, param, "when=bad-export", f"log={calls}")
    bad_uri = f"nbd+unix:///bad?socket={server.sock}"

    # nbdinfo: fails at once with the server's answer (NBD_OPT_INFO, then NBD_OPT_GO, each
    # refused with NBD_REP_ERR_UNKNOWN: one log line each).
    start = time.monotonic()
    info = run_client(["nbdinfo", bad_uri], check=False, timeout=20)
    assert time.monotonic() - start < 10
    assert info.returncode == 1
    assert "server replied with error to opt_go request: No such file or directory" in info.stderr
    assert server.errors() == [line, line]

    # The libnbd Python binding: connect raises; one more log line.
    start = time.monotonic()
    with pytest.raises(nbd.Error) as failure:
        connect(server, "bad")
    assert time.monotonic() - start < 10
    assert failure.value.errnum == errno.ENOENT
    assert "server has no export named 'bad'" in str(failure.value)
    assert server.errors() == [line, line, line]

    # The healthy export is served to the next clients.
    assert run_client(["nbdinfo", "--size", server.uri]).stdout == f"{MiB}\n"
    second_client_works(server)
    assert server.errors() == [line] * 3
    assert_no_traceback(server.log())

    # No handle leaked: each open whose get_size failed was closed again (a failed open
    # has no handle to close).
    failed_opens = 3 if case == "open-raises" else 0
    wait_for(lambda: read_lines(calls).count("close") + failed_opens
             == read_lines(calls).count("open"), "every handle to be closed")


# === 4. Coroutines ============================================================================

YIELD_MESSAGES = {
    "5.4": "attempt to yield from outside a coroutine",
    "5.3": "attempt to yield from outside a coroutine",
    "5.2": "attempt to yield from outside a coroutine",
    "5.5": "attempt to yield from outside a coroutine",
    "5.1": "attempt to yield across metamethod/C-call boundary",
    "luajit": "{where}: attempt to yield across C-call boundary",
}


def _runtime(name: str) -> Any:
    import importlib.util

    module = {"5.4": "lupa.lua54", "5.3": "lupa.lua53", "5.2": "lupa.lua52",
              "5.5": "lupa.lua55", "5.1": "lupa.lua51", "luajit": "lupa.luajit21"}[name]
    return pytest.param(name, marks=pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"lupa has no {module} here"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lua", [_runtime(n) for n in YIELD_MESSAGES])
def test_yield_outside_a_coroutine(start_server: StartServer, lua: str) -> None:
    server = start_server(COROUTINES, options=[f"--lua={lua}"])
    h = connect(server)
    assert try_call(lambda: h.pread(512, 0)) == "EIO"
    # The connection goes on, and coroutines inside the callback work.
    assert h.pread(8, 512) == b"gen-gen-"
    assert try_call(lambda: h.pread(512, 0)) == "EIO"
    h.shutdown()
    message = YIELD_MESSAGES[lua].format(
        where=where(COROUTINES, line_of(COROUTINES, 'coroutine.yield("from pread")'), lua))
    assert server.errors() == [f"luanbd: error: pread: {message}"] * 2
    # A yield in open: a clean handshake error, then the server goes on.
    with pytest.raises(nbd.Error) as failure:
        connect(server, "yield")
    assert failure.value.errnum == errno.ENOENT
    assert server.errors()[-1].startswith("luanbd: error: open: ")
    assert len(server.errors()) == 3
    assert connect(server).pread(4, 512) == b"gen-"
    assert_no_traceback(server.log())


@pytest.mark.timeout(60)
def test_coroutines_inside_callbacks_work(start_server: StartServer) -> None:
    server = start_server(COROUTINES)
    h = connect(server)
    # A generator built and drained inside one pread.
    assert h.pread(4096, 512) == (b"gen-" * 1024)
    # A coroutine kept between requests, and shared by the connections (one Lua state).
    assert h.pread(4, 1024) == b"1   "
    assert h.pread(4, 1024) == b"2   "
    other = connect(server)
    assert other.pread(4, 1024) == b"3   "
    assert h.pread(4, 1024) == b"4   "
    # A yield through a pcall inside a coroutine (Lua 5.2+).
    assert h.pread(4, 1536) == b"pq  "
    # pread crossing sectors: the first sector's answer decides (sector 1: the generator).
    assert h.pread(8, 1020) == b"gen-gen-"
    h.shutdown()
    other.shutdown()
    assert server.errors() == []


# === 5. A callback that exhausts memory =======================================================

def vm_size(pid: int) -> int:
    """The process's address-space size in bytes (VmSize)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * KiB
    raise AssertionError("no VmSize")


MEMHOG = """\
API_VERSION = 2
function open(readonly) return {} end
function get_size(h) return 64 * 1024 * 1024 end
function pread(h, count, offset, flags)
  if offset == 0 then                         -- a table that grows without end
    local t = {}
    for i = 1, math.huge do t[i] = i end
  elseif offset == 512 then                   -- a string Lua refuses to build
    local s = string.rep("x", 2^40)
  elseif offset == 1024 then                  -- a string too big for the memory left
    return string.rep("x", 3 * 2^28):sub(1, count)
  end
  return string.rep("\\0", count)
end
"""
#: The address space the memory test leaves luanbd beyond what it uses when idle.
HEADROOM = 256 * MiB


@not_sanitized("RLIMIT_AS cannot bound a process that maps its shadow")
@pytest.mark.timeout(60)
def test_callback_out_of_memory(start_server: StartServer, workdir: Path) -> None:
    memhog = workdir / "memhog.lua"
    memhog.write_text(MEMHOG)
    server = start_server(str(memhog))
    h = connect(server)
    # Without a limit the table would grow to the machine's whole memory.
    limit = vm_size(server.proc.pid) + HEADROOM
    resource.prlimit(server.proc.pid, resource.RLIMIT_AS, (limit, limit))
    assert try_call(lambda: h.pread(512, 0)) == "ENOMEM"
    assert try_call(lambda: h.pread(512, 512)) == "EIO"
    assert try_call(lambda: h.pread(512, 1024)) == "ENOMEM"
    assert try_call(lambda: h.pread(512, 0)) == "ENOMEM"  # again: nothing is left broken
    # The memory came back: a 32 MiB read (Lua string plus Python copies) works.
    assert h.pread(32 * MiB, 4096) == bytes(32 * MiB)
    h.shutdown()
    second = connect(server)
    assert second.pread(512, 2048) == bytes(512)
    second.shutdown()
    assert server.alive()
    rep_line = line_of(str(memhog), 'string.rep("x", 2^40)')
    assert server.errors() == [
        "luanbd: error: pread: not enough memory",
        f"luanbd: error: pread: {where(str(memhog), rep_line)}: resulting string too large",
        "luanbd: error: pread: not enough memory",
        "luanbd: error: pread: not enough memory",
    ]


def has_lua_memory_limit() -> bool:
    help_text = subprocess.run([LUANBD, "--help"], capture_output=True, text=True,
                               timeout=30, check=False).stdout
    return "--lua-memory-limit" in help_text


@pytest.mark.skipif(not has_lua_memory_limit(), reason="luanbd has no --lua-memory-limit")
@pytest.mark.timeout(60)
def test_write_bigger_than_the_lua_memory_limit(workdir: Path) -> None:
    with own_server(workdir, "--lua-memory-limit=32M", FAULTY, "size=64M") as server:
        h = connect(server)
        assert try_call(lambda: h.pwrite(b"w" * (40 * MiB), 0)) == "ENOMEM"
        h.pwrite(b"small" * 100, 0)  # the same connection goes on
        assert h.pread(500, 0) == b"small" * 100
        h.shutdown()
        second_client_works(server)
        assert server.stop() == 0
    assert_no_traceback(server.log())
    assert len(server.errors()) == 1


# === 6. An error or a wrong return type in each remaining callback ============================

def _bad(cb: str, message: str) -> tuple[str, str]:
    return f"bad={cb}", f"luanbd: error: {cb}: {message}"


NOT_BOOLEAN = "return value is not a boolean"
#: Callbacks of the handshake: the client's NBD_OPT_GO fails (libnbd: ENOENT; preconnect,
#: block_size: the connection is closed).  Each misbehaves only once (when=once).
HANDSHAKE_CASES = {
    **{f"{cb}-raises": (f"fail={cb}", injected(cb)) for cb in (
        "preconnect", "default_export", "export_description", "block_size", "can_write",
        "can_flush", "can_trim", "can_zero", "can_fast_zero", "can_extents", "can_fua",
        "can_multi_conn", "can_cache", "is_rotational")},
    "default_export-not-string": _bad("default_export", "return value is not a string"),
    "export_description-not-string": _bad("export_description",
                                          "return value is not a string"),
    "block_size-one-value": _bad("block_size",
                                 "expected 3 return values: minimum, preferred, maximum"),
    "can_zero-not-boolean": _bad("can_zero", NOT_BOOLEAN),
    "can_fast_zero-not-boolean": _bad("can_fast_zero", NOT_BOOLEAN),
    "can_extents-not-boolean": _bad("can_extents", NOT_BOOLEAN),
    "can_multi_conn-not-boolean": _bad("can_multi_conn", NOT_BOOLEAN),
    "can_fua-not-a-mode": _bad(
        "can_fua", "return value is not one of nbdkit.FUA_NONE, _EMULATE or _NATIVE"),
    "can_cache-not-a-mode": _bad(
        "can_cache", "return value is not one of nbdkit.CACHE_NONE, _EMULATE or _NATIVE"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(HANDSHAKE_CASES))
def test_handshake_callback_misbehaves(start_server: StartServer, workdir: Path,
                                       case: str) -> None:
    param, line = HANDSHAKE_CASES[case]
    calls = workdir / "calls.log"
    # start_server's readiness probe is a connection too, and would be the one to meet
    # the failing preconnect: for that case, this test's client is the first connection.
    probe = param != "fail=preconnect"
    server = start_server(FAULTY, param, "when=once", f"log={calls}", wait=probe)
    start = time.monotonic()
    with pytest.raises(nbd.Error) as failure:
        (connect if probe else first_connection)(server)
    assert time.monotonic() - start < 10
    if param == "fail=preconnect":
        assert "server disconnected unexpectedly" in str(failure.value)
        assert read_lines(calls) == []  # open was never called
    elif "block_size" in case:
        # As nbdkit: block_size is asked while NBD_INFO_BLOCK_SIZE is built, and its
        # failure ends the connection (nbdkit's blocksize-policy filter shows it).
        assert "server disconnected unexpectedly" in str(failure.value)
    else:
        assert failure.value.errnum == errno.ENOENT, failure.value
        assert "server has no export named ''" in str(failure.value)
    assert server.errors() == [line]
    second_client_works(server)
    assert server.errors() == [line]
    assert_no_traceback(server.log())
    # Every handle that was opened is closed (the failed one right away).
    wait_for(lambda: read_lines(calls).count("close") == read_lines(calls).count("open"),
             "every handle to be closed")


LIST_CASES = {
    "list_exports-raises": ("fail=list_exports", injected("list_exports")),
    "list_exports-not-table": _bad("list_exports", "return value is not a table"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(LIST_CASES))
def test_list_exports_misbehaves(start_server: StartServer, case: str) -> None:
    param, line = LIST_CASES[case]
    server = start_server(FAULTY, param, "when=once")

    def list_exports() -> list[str]:
        h = connect(server, opt_mode=True)
        names: list[str] = []
        try:
            h.opt_list(lambda name, description: names.append(name))
        finally:
            h.opt_abort()  # the handshake ends either way
        return names

    with pytest.raises(nbd.Error) as failure:
        list_exports()
    assert failure.value.errnum == errno.ENOTSUP  # NBD_REP_ERR_PLATFORM, as libnbd reads it
    assert server.errors() == [line]
    assert list_exports() == ["", "bad"]
    second_client_works(server)
    assert server.errors() == [line]


DATA_CASES: dict[str, tuple[str, Callable[[nbd.NBD], Any], str]] = {
    "cache-raises": ("fail=cache", lambda h: h.cache(4096, 0), injected("cache")),
    "extents-raises": ("fail=extents", lambda h: h.block_status(4096, 0, lambda *a: 0),
                       injected("extents")),
    "extents-not-table": ("bad=extents", lambda h: h.block_status(4096, 0, lambda *a: 0),
                          "luanbd: error: extents: return value is not a table"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_callback_misbehaves(start_server: StartServer, case: str) -> None:
    param, call, line = DATA_CASES[case]
    server = start_server(FAULTY, param, "when=once")
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(server.uri)
    assert try_call(lambda: call(h)) == "EIO"
    assert server.errors() == [line]
    call(h)  # the same request on the same connection now works
    h.pwrite(b"same connection" * 10, 0)
    assert h.pread(150, 0) == b"same connection" * 10
    h.shutdown()
    second_client_works(server)
    assert server.errors() == [line]


STARTUP_CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "load-raises": ([], {"FAULTY_FAIL": "load"}, injected("load")),
    "thread_model-raises": (["fail=thread_model"], {}, injected("thread_model")),
    "thread_model-not-a-name": (["bad=thread_model"], {},
                                "luanbd: error: thread_model: unknown thread model '42'"),
    "get_ready-raises": (["fail=get_ready"], {}, injected("get_ready")),
    "after_fork-raises": (["fail=after_fork"], {}, injected("after_fork")),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(STARTUP_CASES))
def test_startup_callback_fails(case: str) -> None:
    # One line on stderr, exit status 1, and the --run command never runs.
    params, env, line = STARTUP_CASES[case]
    result = run_luanbd("-U", "-", FAULTY, *params, "--run", "echo SERVED",
                        env=client_env(**env))
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_dump_plugin_callback_fails() -> None:
    # The facts and what dump_plugin printed before failing are kept; one error line, and
    # exit status 0, as nbdkit 1.32's Lua plugin.
    result = run_luanbd(FAULTY, "fail=dump_plugin", "--dump-plugin")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"path={FAULTY}"
    assert "has_dump_plugin=1" in lines
    assert lines[-1] == "faulty_dump=1"
    assert result.stderr.splitlines() == [injected("dump_plugin")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cb", ["cleanup", "unload"])
def test_shutdown_callback_fails(start_server: StartServer, workdir: Path, cb: str) -> None:
    # Logged once at exit; the exit status stays 0 and the other callback still runs.
    calls = workdir / "calls.log"
    server = start_server(FAULTY, f"fail={cb}", f"log={calls}")
    second_client_works(server)
    assert server.errors() == []
    assert server.stop() == 0
    assert server.errors() == [injected(cb)]
    assert_no_traceback(server.log())
    assert read_lines(calls)[-2:] == ["cleanup", "unload"]



# --- an error object whose __tostring raises (luanbd bug) -------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("cb", ["pread", "open", "close", "unload"])
def test_error_object_with_failing_tostring(workdir: Path, cb: str) -> None:
    # Expected: like any other error in that callback, one log line naming it (the
    # message of the failing __tostring, or a placeholder), and everything goes on.
    with own_server(workdir, FAULTY, "error=tostring-raises", f"fail={cb}",
                    "when=once") as server:
        if cb == "pread":
            h = connect(server)
            assert try_call(lambda: h.pread(512, 0)) == "EIO"
            assert h.pread(512, 0) == bytes(512)  # the same connection goes on
            h.shutdown()
        elif cb == "open":
            with pytest.raises(nbd.Error) as failure:
                connect(server)
            assert failure.value.errnum == errno.ENOENT  # a clean NBD_REP_ERR_UNKNOWN
        elif cb == "close":
            assert server.sock is not None
            with RawClient(server.sock) as c:
                c.connect_export()
                c.send_request(CMD_DISC)
                assert c.closed_by_server(3), "the server never closed the connection"
        second_client_works(server)
        status = server.stop()
    log = server.log()
    assert_no_traceback(log)
    assert "internal error" not in log
    assert status == 0
    (line,) = server.errors()
    assert line.startswith(f"luanbd: error: {cb}: ")


@pytest.mark.timeout(60)
def test_error_object_with_failing_tostring_in_config() -> None:
    # Expected: a start-up error like any other: one line, exit status 1, no traceback.
    result = subprocess.run(
        [LUANBD, "-U", "-", FAULTY, "error=tostring-raises", "fail=config",
         "--run", "echo SERVED"],
        capture_output=True, text=True, timeout=30, env=client_env(), check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("luanbd: error: config: ")
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_thread_model_object_with_failing_tostring(workdir: Path) -> None:
    plugin = workdir / "tm.lua"
    plugin.write_text(
        "API_VERSION = 2\n"
        "thread_model = setmetatable({}, {__tostring = function() error('no name') end})\n"
        "function open(readonly) return {} end\n"
        "function get_size(h) return 512 end\n"
        "function pread(h, count, offset, flags) return string.rep('\\0', count) end\n")
    result = subprocess.run([LUANBD, "-U", "-", str(plugin), "--run", "echo SERVED"],
                            capture_output=True, text=True, timeout=30, env=client_env(),
                            check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("luanbd: error: thread_model: ")
