#!/usr/bin/env python3
"""What connections cost a server, and whether stalled ones keep a new client waiting.

    .venv/bin/python bench/connections.py                       # all loads, ~1 min
    .venv/bin/python bench/connections.py --connections 2000 --servers luanbd,nbdkit-lua
    .venv/bin/python bench/connections.py --fio-jobs 0 --burst 0   # no fio, no burst

The measurements of tests/integration/test_many_clients.py (issue 5's "many clients", issue
4's memory target), on luanbd and on ``nbdkit lua`` running the same script. For each server
and each load, a fresh server on a private Unix socket:

- ``idle``: ``--idle`` connections (64) that finished the handshake (NBD_OPT_GO) and send
  nothing more. Issue 4's target: RSS at most 64 MiB above the RSS with none.
- ``mixed``: ``--connections`` connections (1000): 30 % idle after NBD_OPT_GO (opened
  first), 30 % that sent their client flags and half an option header, 40 % that connected
  and said nothing.
- ``burst``: ``--burst`` (1000) libnbd ``aio_connect`` calls in a row, as fast as they go:
  each is a connect() on a non-blocking socket, refused with EAGAIN while the server's
  listen backlog is full (luanbd listens with a backlog of 128, nbdkit with SOMAXCONN).
- ``fio``: one fio with ``--fio-jobs`` jobs (64), one connection each, randrw on disjoint
  2 MiB regions with verify=crc32c; the peak RSS is sampled from /proc every 10 ms.

For each: the server's VmRSS with no connection and under the load, the thread count, and
the time a new libnbd client takes to connect and read 4 KiB while the load is there (a
client still in the handshake after ``--timeout`` seconds is reported as blocked). The
servers: ``luanbd`` (examples/ramdisk.lua, the default thread model), ``luanbd-parallel``
(tests/integration/scripts/parallel_ram.lua: a Lua state per connection; nbdkit 1.32's Lua
plugin has no thread models, so it has no nbdkit twin) and ``nbdkit-lua``
(``nbdkit -f -U SOCK lua examples/ramdisk.lua``). Prints a Markdown table per load.

RSS figures depend on the C library's allocator: the first load after start-up is the one
measured here. A long-running server that has had many connections come and go keeps more
(glibc keeps freed memory in its per-thread arenas).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
RAMDISK = REPO / "examples" / "ramdisk.lua"
PARALLEL = REPO / "tests" / "integration" / "scripts" / "parallel_ram.lua"
FIO_REGION = 2 * MIB

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
CLIENT_FLAGS = 3  # FIXED_NEWSTYLE | NO_ZEROES
OPT_GO = 7
REP_ACK = 1


def log(msg: str) -> None:
    print(f"connections.py: {msg}", file=sys.stderr, flush=True)


def luanbd_command() -> str:
    venv = REPO / ".venv" / "bin" / "luanbd"
    if venv.exists():
        return str(venv)
    found = shutil.which("luanbd")
    if not found:
        sys.exit("connections.py: no luanbd: run scripts/setup.sh (it builds .venv)")
    return found


def server_commands(size: int) -> dict[str, Callable[[str], list[str]]]:
    luanbd = luanbd_command()
    return {
        "luanbd": lambda sock: [luanbd, "-f", "-U", sock, str(RAMDISK), f"size={size}"],
        "luanbd-parallel": lambda sock: [luanbd, "-f", "-U", sock, str(PARALLEL),
                                         f"size={size}"],
        "nbdkit-lua": lambda sock: ["nbdkit", "-f", "-U", sock, "lua", str(RAMDISK),
                                    f"size={size}"],
    }


# --- /proc ----------------------------------------------------------------------------------------

def status(pid: int) -> tuple[float, int]:
    """(VmRSS in MiB, thread count) of ``pid``."""
    rss, threads = 0.0, 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def wait_threads(pid: int, done: Callable[[int], bool], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        _, n = status(pid)
        if done(n) or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def settled(pid: int) -> tuple[float, int]:
    time.sleep(0.5)
    return status(pid)


class PeakSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0.0
        self.peak_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss, threads = status(self.pid)
            except OSError:
                return
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_threads = max(self.peak_threads, threads)
            self._stop.wait(0.01)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- a server -------------------------------------------------------------------------------------

@contextlib.contextmanager
def running(name: str, argv_of: Callable[[str], list[str]]) -> Iterator[tuple[int, str]]:
    """A fresh server on a private socket: (pid, socket path)."""
    tmp = Path(tempfile.mkdtemp(prefix="lnbd-conn-"))
    sock = str(tmp / "s.sock")
    errlog = open(tmp / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(argv_of(sock), stdin=subprocess.DEVNULL, stdout=errlog,
                            stderr=errlog)
    try:
        deadline = time.monotonic() + 15
        while True:  # until a connection gets the greeting
            if proc.poll() is not None:
                sys.exit(f"connections.py: {name} exited {proc.returncode}:\n"
                         f"{(tmp / 'server.log').read_text()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(sock)
                if s.recv(8) == NBDMAGIC:
                    break
            if time.monotonic() > deadline:
                sys.exit(f"connections.py: {name} did not listen on {sock}")
            time.sleep(0.05)
        yield proc.pid, sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errlog.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --- clients --------------------------------------------------------------------------------------

def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data


def connect(sock: str) -> socket.socket:
    """A blocking connect (it waits while the server's listen backlog is full), then a
    30 s timeout for what follows."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.settimeout(30)
    return s


def idle_connection(sock: str) -> socket.socket:
    """NBD_OPT_GO done, then nothing."""
    s = connect(sock)
    magic, opt, _ = struct.unpack(">8sQH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT
    s.sendall(struct.pack(">I", CLIENT_FLAGS)
              + struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _option, reply, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if reply == REP_ACK:
            return s
        if reply & 0x80000000:
            raise RuntimeError(f"NBD_OPT_GO refused: reply {reply:#x}")


def stalled_connection(sock: str) -> socket.socket:
    """Client flags and half an option header, sent without waiting for the greeting (a
    server that keeps the handshake of a silent client under a lock never sends it)."""
    s = connect(sock)
    s.sendall(struct.pack(">IQ", CLIENT_FLAGS, IHAVEOPT))
    return s


def new_client(uri: str, timeout: float) -> float | None:
    """Seconds for a new libnbd client to connect and read 4 KiB; None if blocked."""
    start = time.monotonic()
    h = nbd.NBD()
    h.aio_connect_uri(uri)
    while not h.aio_is_ready():
        if h.aio_is_dead() or h.aio_is_closed():
            raise RuntimeError(f"libnbd's connection to {uri} died in the handshake")
        if time.monotonic() - start > timeout:
            del h
            return None
        h.poll(50)
    h.pread(4096, 0)
    elapsed = time.monotonic() - start
    h.shutdown()
    return elapsed


# --- measurements ---------------------------------------------------------------------------------

@dataclass
class Row:
    server: str
    load: str
    connections: int
    rss_before: float
    rss_with: float
    threads_with: int
    new_client: float | None = None
    refused: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def delta(self) -> float:
        return self.rss_with - self.rss_before


def connection_load(name: str, argv_of: Callable[[str], list[str]], load: str, total: int,
                    timeout: float) -> Row:
    with running(name, argv_of) as (pid, sock):
        rss_before, threads_before = settled(pid)
        if load == "idle":
            plan = [("idle", total)]
        else:
            idle = total * 3 // 10
            stalled = total * 3 // 10
            plan = [("idle", idle), ("stalled", stalled), ("silent", total - idle - stalled)]
        opener = {"idle": idle_connection, "stalled": stalled_connection, "silent": connect}
        sockets: list[socket.socket] = []
        start = time.monotonic()
        try:
            for kind, count in plan:
                sockets.extend(opener[kind](sock) for _ in range(count))
            opened = time.monotonic() - start
            wait_threads(pid, lambda n: n >= threads_before + total, 10)
            rss_with, threads_with = settled(pid)
            row = Row(name, load, total, rss_before, rss_with, threads_with)
            row.new_client = new_client(f"nbd+unix:///?socket={sock}", timeout)
            row.notes.append(f"opened in {opened:.1f} s")
        finally:
            for s in sockets:
                s.close()
        left = wait_threads(pid, lambda n: n <= threads_before, 30)
        if left > threads_before:
            row.notes.append(f"{left} threads 30 s after closing (at start: {threads_before})")
        log(f"{name} {load} {total}: RSS {rss_before:.1f} -> {rss_with:.1f} MiB, "
            f"threads {threads_before} -> {threads_with}, new client {row.new_client}")
        return row


def burst_load(name: str, argv_of: Callable[[str], list[str]], total: int,
               timeout: float) -> Row:
    """``total`` libnbd aio_connect calls in a row: each is a connect() on a non-blocking
    socket, which fails with EAGAIN once the server's listen backlog is full."""
    with running(name, argv_of) as (pid, sock):
        rss_before, threads_before = settled(pid)
        uri = f"nbd+unix:///?socket={sock}"
        handles, refused = [], 0
        start = time.monotonic()
        for _ in range(total):
            h = nbd.NBD()
            try:
                h.aio_connect_uri(uri)
            except nbd.Error:
                refused += 1
            else:
                handles.append(h)
        burst = time.monotonic() - start
        rss_with, threads_with = settled(pid)
        row = Row(name, "burst", total, rss_before, rss_with, threads_with)
        row.refused = refused
        row.notes.append(f"{total} connects in {burst * 1000:.0f} ms: {len(handles)} "
                         f"accepted, {refused} refused (EAGAIN)")
        del handles[:]
        left = wait_threads(pid, lambda n: n <= threads_before, 30)
        if left > threads_before:
            row.notes.append(f"{left} threads 30 s after closing (at start: {threads_before})")
        row.new_client = new_client(uri, timeout)
        log(f"{name} burst {total}: {refused} refused")
        return row


def fio_load(name: str, argv_of: Callable[[str], list[str]], jobs: int) -> Row:
    with running(name, argv_of) as (pid, sock):
        rss_before, _ = settled(pid)
        start = time.monotonic()
        with PeakSampler(pid) as peak:
            result = subprocess.run([
                "fio", "--name=many", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                "--rw=randrw", "--bs=4k", "--iodepth=4", f"--numjobs={jobs}",
                f"--size={FIO_REGION}", f"--offset_increment={FIO_REGION}",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
            ], capture_output=True, text=True, timeout=600, check=False)
        elapsed = time.monotonic() - start
        row = Row(name, "fio", jobs, rss_before, peak.peak_rss, peak.peak_threads)
        row.notes.append(f"fio {elapsed:.1f} s")
        errors = "?"
        with contextlib.suppress(ValueError, KeyError):
            report = json.loads(result.stdout[result.stdout.index("{"):])
            errors = str(sum(1 for job in report["jobs"] if job["error"]))
        if result.returncode != 0 or errors != "0":
            last = (result.stderr.strip().splitlines() or [""])[-1]
            row.notes.append(f"**fio exit {result.returncode}, {errors} jobs with errors** "
                             f"{last}")
        log(f"{name} fio {jobs} jobs: RSS {rss_before:.1f} -> peak {peak.peak_rss:.1f} MiB "
            f"in {elapsed:.1f} s, exit {result.returncode}")
        return row


# --- output ---------------------------------------------------------------------------------------

def fmt_client(seconds: float | None, timeout: float) -> str:
    if seconds is None:
        return f"**blocked** (> {timeout:g} s)"
    return f"{seconds * 1000:.1f} ms"


def table(rows: list[Row], timeout: float, fio: bool = False) -> str:
    if fio:
        head = ("| server | fio jobs | RSS before (MiB) | peak RSS (MiB) | delta (MiB) "
                "| peak threads | notes |\n|---|---:|---:|---:|---:|---:|---|")
        lines = [f"| {r.server} | {r.connections} | {r.rss_before:.1f} | {r.rss_with:.1f} | "
                 f"+{r.delta:.1f} | {r.threads_with} | {'; '.join(r.notes)} |" for r in rows]
    else:
        head = ("| server | connections | RSS none (MiB) | RSS with (MiB) | delta (MiB) "
                "| per conn (KiB) | threads | new client: connect + 4 KiB read | notes |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---|")
        lines = [f"| {r.server} | {r.connections} | {r.rss_before:.1f} | {r.rss_with:.1f} | "
                 f"+{r.delta:.1f} | {r.delta * 1024 / r.connections:.0f} | {r.threads_with} | "
                 f"{fmt_client(r.new_client, timeout)} | {'; '.join(r.notes)} |" for r in rows]
    return "\n".join([head, *lines])


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        log(f"warning: RLIMIT_NOFILE hard limit {hard} < {need}: connections may fail")


def version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                             check=False).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000,
                        help="connections of the mixed load (default 1000)")
    parser.add_argument("--idle", type=int, default=64,
                        help="connections of the idle load (default 64; 0: none)")
    parser.add_argument("--burst", type=int, default=1000,
                        help="libnbd connects of the burst load (default 1000; 0: none)")
    parser.add_argument("--fio-jobs", type=int, default=64,
                        help="fio jobs of the fio load (default 64; 0: none)")
    parser.add_argument("--servers", default="luanbd,luanbd-parallel,nbdkit-lua",
                        help="comma-separated, of: luanbd, luanbd-parallel, nbdkit-lua")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds before a new client is reported as blocked (default 10)")
    args = parser.parse_args()

    size = max(64 * MIB, args.fio_jobs * FIO_REGION)
    commands = server_commands(size)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    for n in names:
        if n not in commands:
            parser.error(f"unknown server {n!r} (known: {', '.join(commands)})")
    if "nbdkit-lua" in names and not shutil.which("nbdkit"):
        log("nbdkit is not installed: leaving nbdkit-lua out")
        names.remove("nbdkit-lua")
    if args.fio_jobs and not shutil.which("fio"):
        parser.error("fio is not installed (or pass --fio-jobs 0)")
    raise_fd_limit(max(args.connections, args.idle, args.burst, args.fio_jobs) * 2 + 256)

    idle_rows, mixed_rows, burst_rows, fio_rows = [], [], [], []
    for name in names:
        if args.idle:
            idle_rows.append(connection_load(name, commands[name], "idle", args.idle,
                                             args.timeout))
        if args.connections:
            mixed_rows.append(connection_load(name, commands[name], "mixed", args.connections,
                                              args.timeout))
        if args.burst:
            burst_rows.append(burst_load(name, commands[name], args.burst, args.timeout))
        if args.fio_jobs:
            fio_rows.append(fio_load(name, commands[name], args.fio_jobs))

    luanbd_version = version([luanbd_command(), "--version"])
    commit = version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    print(f"Connections: {luanbd_version} (commit {commit}), {version(['nbdkit', '--version'])},"
          f" Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average "
          f"{os.getloadavg()[0]:.2f}; disk {size // MIB} MiB\n")
    if idle_rows:
        print(f"### {args.idle} idle connections (after NBD_OPT_GO)\n")
        print(table(idle_rows, args.timeout))
        print("\nIssue 4's target, delta <= 64 MiB: "
              + ", ".join(f"{r.server} {'yes' if r.delta <= 64 else '**no**'}"
                          for r in idle_rows) + "\n")
    if mixed_rows:
        n = args.connections
        idle, stalled = n * 3 // 10, n * 3 // 10
        print(f"### {n} connections: {idle} idle after NBD_OPT_GO, {stalled} stalled "
              f"mid-option, {n - idle - stalled} silent\n")
        print(table(mixed_rows, args.timeout) + "\n")
    if burst_rows:
        print(f"### A burst of {args.burst} libnbd connects (non-blocking connect(), as "
              f"libnbd does; EAGAIN once the listen backlog is full)\n")
        print("| server | connects | refused (EAGAIN) | new client afterwards | notes |\n"
              "|---|---:|---:|---:|---|")
        for r in burst_rows:
            print(f"| {r.server} | {r.connections} | {r.refused} | "
                  f"{fmt_client(r.new_client, args.timeout)} | {'; '.join(r.notes)} |")
        print()
    if fio_rows:
        print(f"### {args.fio_jobs} fio jobs at once (randrw, verify=crc32c, "
              f"{FIO_REGION // MIB} MiB each)\n")
        print(table(fio_rows, args.timeout, fio=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
