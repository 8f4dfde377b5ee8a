"""Crash consistency: clients write while luanbd is killed, then the file is checked.

One *round*: luanbd serves a file-backed plugin (examples/file.lua, or the parallel variant
tests/integration/plugins/file_parallel.lua) on a file that survives the rounds; CLIENTS
libnbd connections write pattern data, some writes with FUA, some followed by a FLUSH; at a
random moment (0 to MAX_RUN seconds after the clients started, so some kills land in the
handshake) the server gets SIGKILL (or SIGTERM). The next round's server, started on the same
file, first reads the whole disk back and checks it:

* every sector holds exactly one generation's pattern (a 512-byte sector names its write's
  generation, client and sector number, and the rest of it is derived from them), or zeros
  if it was never written: nothing *torn*;
* that generation is one that was written to that very sector (nothing *stray*);
* it is at least the newest *durable* write's: a write whose FUA reply arrived, or whose reply
  arrived before a FLUSH was sent on the same connection and that FLUSH's reply arrived
  (SIGKILL), or any write whose reply arrived (SIGTERM). Anything older is *lost*.

Unacknowledged writes may or may not be there. Each client owns its own sectors and never has
two writes to one sector in flight, so the generations of a sector are ordered in time.

``python tests/crash/run.py --kills 200`` runs the long version; test_crash.py a short one.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd

ROOT = Path(__file__).resolve().parents[2]
LUANBD = str(Path(sys.executable).parent / "luanbd")
PLUGINS = {
    "file": str(ROOT / "examples" / "file.lua"),
    "file_parallel": str(ROOT / "tests" / "integration" / "plugins" / "file_parallel.lua"),
}

SECTOR = 512
CLIENTS = 4
#: Sectors each client owns (its region of the disk).
REGION = 512
DISK_SECTORS = CLIENTS * REGION
#: Sectors in one write: 1 to MAX_WRITE.
MAX_WRITE = 16
DEPTH = 8
#: Seconds from the clients' start to the signal: uniform in [0, MAX_RUN].
MAX_RUN = 0.4
FUA_SHARE = 0.3
FLUSH_EVERY = 12

_HEAD = struct.Struct(">8sQII")  # magic, generation, client, sector
_MAGIC = b"crashgen"


def sector_data(gen: int, client: int, sector: int) -> bytes:
    """The 512 bytes generation ``gen`` of ``client`` writes to ``sector``."""
    head = _HEAD.pack(_MAGIC, gen, client, sector)
    word = struct.pack(">QQ", gen * 0x9E3779B97F4A7C15 % (1 << 64), sector ^ (client << 32))
    return (head + word * (SECTOR // len(word)))[:SECTOR]


def decode(data: bytes, sector: int) -> int | None:
    """The generation a sector read back holds: 0 for zeros, None when it is torn."""
    if data == bytes(SECTOR):
        return 0
    magic, gen, client, where = _HEAD.unpack_from(data)
    if magic != _MAGIC or where != sector or data != sector_data(gen, client, sector):
        return None
    return int(gen)


@dataclass
class Write:
    gen: int
    first: int
    count: int
    fua: bool
    acked: bool = False
    durable: bool = False


class Client(threading.Thread):
    """One connection writing to its own region until the server goes away."""

    def __init__(self, uri: str, number: int, gens: Iterator[int], seed: int) -> None:
        super().__init__(name=f"crash-client-{number}", daemon=True)
        self.uri = uri
        self.number = number
        self.gens = gens
        self.rng = random.Random(seed)
        self.writes: list[Write] = []
        self.flushes_acked = 0
        self.errors: dict[str, int] = {}
        self.exception: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except nbd.Error as err:  # the server went away: expected
            key = err.errno or "disconnected"
            self.errors[key] = self.errors.get(key, 0) + 1
        except BaseException as err:  # reported by the harness
            self.exception = err

    def _pick(self, busy: set[int]) -> tuple[int, int] | None:
        base = self.number * REGION
        for _ in range(8):
            count = self.rng.randint(1, MAX_WRITE)
            first = base + self.rng.randrange(REGION - count + 1)
            if not busy.intersection(range(first, first + count)):
                return first, count
        return None

    def _run(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        writes: dict[int, tuple[Write, nbd.Buffer]] = {}
        #: cookie of a FLUSH in flight -> the writes it makes durable.
        flushes: dict[int, list[Write]] = {}
        done_since_flush: list[Write] = []
        busy: set[int] = set()
        since_flush = 0
        while not self.stop.is_set():
            while len(writes) < DEPTH:
                if since_flush >= FLUSH_EVERY:
                    flushes[h.aio_flush()] = done_since_flush
                    done_since_flush, since_flush = [], 0
                    continue
                pick = self._pick(busy)
                if pick is None:
                    break
                w = Write(next(self.gens), *pick, fua=self.rng.random() < FUA_SHARE)
                payload = b"".join(sector_data(w.gen, self.number, s)
                                   for s in range(w.first, w.first + w.count))
                buf = nbd.Buffer.from_bytearray(bytearray(payload))
                self.writes.append(w)
                busy.update(range(w.first, w.first + w.count))
                cookie = h.aio_pwrite(buf, w.first * SECTOR,
                                      flags=nbd.CMD_FLAG_FUA if w.fua else 0)
                writes[cookie] = (w, buf)
                since_flush += 1
            h.poll(-1)
            for cookie in list(writes):
                if not h.aio_command_completed(cookie):
                    continue
                w, _ = writes.pop(cookie)
                w.acked = True
                w.durable = w.fua
                busy.difference_update(range(w.first, w.first + w.count))
                done_since_flush.append(w)
            for cookie in list(flushes):
                if h.aio_command_completed(cookie):
                    for w in flushes.pop(cookie):
                        w.durable = True
                    self.flushes_acked += 1
        with contextlib.suppress(nbd.Error):
            h.shutdown()


@dataclass
class Totals:
    rounds: int = 0
    writes: int = 0
    acked: int = 0
    durable: int = 0
    sectors_checked: int = 0
    lost: int = 0
    torn: int = 0
    stray: int = 0
    flushes_acked: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self, what: str) -> str:
        return (f"{what}: {self.rounds} rounds, {self.writes} writes sent, {self.acked} "
                f"acknowledged, {self.durable} checked as required ({self.sectors_checked} "
                f"sectors), {self.flushes_acked} flushes; lost {self.lost}, torn {self.torn}, "
                f"stray {self.stray}")


class Server:
    def __init__(self, workdir: Path, plugin: str, disk: Path, n: int) -> None:
        self.sock = workdir / f"s{n}.sock"
        self.log_path = workdir / f"luanbd-{n}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [LUANBD, "-f", "-U", str(self.sock), PLUGINS[plugin], f"file={disk}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"luanbd exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(str(self.sock))
                if s.recv(8) == b"NBDMAGIC":
                    return
            time.sleep(0.01)
        raise RuntimeError(f"luanbd did not listen within {timeout} s:\n{self.log()}")

    def read_disk(self) -> bytes:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        data = bytes(h.pread(DISK_SECTORS * SECTOR, 0))
        h.shutdown()
        return data


class Harness:
    """Rounds of write-and-kill on one file; ``round()`` checks the previous round first."""

    def __init__(self, workdir: Path, plugin: str, sig: int, seed: int) -> None:
        self.workdir = workdir
        self.plugin = plugin
        self.sig = sig
        self.rng = random.Random(seed)
        self.disk = workdir / f"{plugin}.img"
        with open(self.disk, "wb") as f:
            f.truncate(DISK_SECTORS * SECTOR)
        #: The generation each sector is known to hold (read back after the last round).
        self.baseline = [0] * DISK_SECTORS
        self._gen = 0
        self._lock = threading.Lock()
        self.n = 0
        self.totals = Totals()

    def _gens(self) -> Iterator[int]:
        while True:
            with self._lock:
                self._gen += 1
                gen = self._gen
            yield gen

    def start(self) -> Server:
        self.n += 1
        server = Server(self.workdir, self.plugin, self.disk, self.n)
        server.wait_listening()
        return server

    def round(self, server: Server) -> Server:
        """Write on ``server`` until a signal stops it; start and return the next one."""
        gens = self._gens()
        clients = [Client(server.uri, i, gens, self.rng.randrange(1 << 30))
                   for i in range(CLIENTS)]
        for c in clients:
            c.start()
        time.sleep(self.rng.uniform(0, MAX_RUN))
        server.proc.send_signal(self.sig)
        status = server.proc.wait(30)
        for c in clients:
            c.join(10)
            c.stop.set()
        for c in clients:
            c.join(10)
            if c.is_alive() or c.exception is not None:
                self.totals.failures.append(f"client {c.number}: {c.exception!r}")
        log = server.log()
        if self.sig == signal.SIGTERM and status != 0:
            self.totals.failures.append(f"exit status {status} after SIGTERM:\n{log}")
        if "Traceback" in log or "error:" in log:
            self.totals.failures.append(f"luanbd's log after round {self.n}:\n{log}")
        nxt = self.start()
        self.check(nxt.read_disk(), clients)
        return nxt

    def check(self, data: bytes, clients: list[Client]) -> None:
        t = self.totals
        t.rounds += 1
        required = list(self.baseline)
        allowed: list[set[int]] = [{g} for g in self.baseline]
        for c in clients:
            t.flushes_acked += c.flushes_acked
            for w in c.writes:
                t.writes += 1
                t.acked += w.acked
                must = w.durable or (self.sig == signal.SIGTERM and w.acked)
                t.durable += must
                for s in range(w.first, w.first + w.count):
                    allowed[s].add(w.gen)
                    if must:
                        required[s] = max(required[s], w.gen)
                        t.sectors_checked += 1
        for s in range(DISK_SECTORS):
            gen = decode(data[s * SECTOR:(s + 1) * SECTOR], s)
            if gen is None:
                t.torn += 1
                t.failures.append(f"round {t.rounds}: sector {s} torn")
                continue
            if gen not in allowed[s]:
                t.stray += 1
                t.failures.append(f"round {t.rounds}: sector {s} holds generation {gen}, "
                                  "never written there")
            elif gen < required[s]:
                t.lost += 1
                t.failures.append(f"round {t.rounds}: sector {s} holds generation {gen}, "
                                  f"generation {required[s]} was acknowledged as durable")
            self.baseline[s] = gen


def run(workdir: Path, plugin: str, sig: int, kills: int, seed: int) -> Totals:
    """``kills`` rounds of the harness; the totals (failures listed in them)."""
    harness = Harness(workdir, plugin, sig, seed)
    server = harness.start()
    try:
        for _ in range(kills):
            server = harness.round(server)
    finally:
        if server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(30)
    return harness.totals


def main_env() -> None:
    """Make sure the luanbd child finds the same luanbd package as this interpreter."""
    src = str(ROOT / "src")
    paths = os.environ.get("PYTHONPATH", "")
    if src not in paths.split(os.pathsep) and (ROOT / "src" / "luanbd").is_dir():
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, paths) if p)
