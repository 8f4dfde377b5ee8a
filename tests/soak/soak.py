"""The soak run: one luanbd serving mixed clients for a bounded time, then its resources.

luanbd (``--tls=on``, the stats filter, ``--timeout=2``) serves soak.lua's file-backed
exports while these run side by side until the time is up:

* fio verify jobs (``ioengine=nbd``, ``verify=crc32c``) on the main export, one after another;
* nbdcopy round trips: a random file into the "copy" export and back out, compared;
* clients that vanish mid-request: raw sockets that send a WRITE's header and half its
  payload, or pipeline READs, and close without reading the replies;
* silent clients: connect and say nothing, some closing themselves, some cut off by the
  handshake timeout;
* TLS clients (libnbd, certificates made with openssl) writing and reading back;
* clients of the "flaky" export, where 1 % of the requests fail at random (EIO, ENOSPC,
  ENOMEM): every failure must be one of those, every success must read back right;
* a reload (SIGHUP) every second: the script and the stats filter are loaded anew for new
  connections while the open ones finish on theirs (fio's verify spans reloads).

Figures: requests served (the sum of the stats filter's totals, one appended by each
generation when it is unloaded; as many as reloads plus one), errors by errno (as the
clients saw them), luanbd's RSS, open file descriptors and threads at the start (once
listening, before any client) and at the end (once the last client has gone).
``python tests/soak/run.py --seconds 600`` is the long run; test_soak.py the short one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbd

HERE = Path(__file__).resolve().parent
LUANBD = str(Path(sys.executable).parent / "luanbd")
PLUGIN = str(HERE / "soak.lua")
MiB = 1 << 20
MAIN_SIZE = 64 * MiB
COPY_SIZE = 8 * MiB
FLAKY_SIZE = 16 * MiB
#: Seconds between two RSS samples.
SAMPLE = 5.0
#: The errnos soak.lua picks from.
INJECTED = {"EIO", "ENOSPC", "ENOMEM"}


def _openssl(pki: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True, timeout=60)


def make_pki(pki: Path) -> None:
    """server/ (nbdkit's layout) and client/ (libnbd's), signed by a CA made here."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(pki, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
             "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=luanbd soak CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, ext in (("server", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n"),
                     ("client", "extendedKeyUsage=clientAuth\n")):
        (pki / who).mkdir()
        _openssl(pki, "req", "-newkey", "rsa:2048", "-nodes", "-keyout",
                 f"{who}/{who}-key.pem", "-out", f"{who}.csr", "-subj", "/CN=localhost")
        (pki / f"{who}.ext").write_text(ext)
        _openssl(pki, "x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
                 "ca-key.pem", "-CAcreateserial", "-out", f"{who}/{who}-cert.pem", "-days",
                 "2", "-extfile", f"{who}.ext")
        shutil.copy(pki / "ca-cert.pem", pki / who / "ca-cert.pem")


@dataclass
class Figures:
    seconds: float = 0.0
    #: client kind -> requests (or runs) that succeeded
    done: Counter[str] = field(default_factory=Counter)
    #: errno name -> count, as the clients saw them
    errors: Counter[str] = field(default_factory=Counter)
    served: int = 0
    #: The stats filter's reports: one per generation unloaded.
    generations: int = 0
    rss_start: int = 0
    rss_end: int = 0
    fds_start: int = 0
    fds_end: int = 0
    threads_start: int = 0
    threads_end: int = 0
    log_errors: Counter[str] = field(default_factory=Counter)
    #: RSS every SAMPLE seconds during the run
    rss_samples: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        mib = 1 / MiB
        return [
            f"{self.seconds:.0f} s; requests served (stats filter): {self.served} by "
            f"{self.generations} generations",
            "clients: " + ", ".join(f"{k} {v}" for k, v in sorted(self.done.items())),
            "errors by errno: " + (", ".join(f"{k} {v}" for k, v in
                                             sorted(self.errors.items())) or "none"),
            f"RSS {self.rss_start * mib:.1f} MiB at start, {self.rss_end * mib:.1f} MiB at end; "
            f"fds {self.fds_start} -> {self.fds_end}; threads {self.threads_start} -> "
            f"{self.threads_end}",
            "RSS during the run (MiB): " + " ".join(f"{r * mib:.0f}" for r in self.rss_samples),
            "log lines: " + (", ".join(f"{k} {v}" for k, v in
                                       sorted(self.log_errors.items())) or "none"),
        ]


def proc_status(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, open fds, threads) of ``pid``."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


class Soak:
    def __init__(self, workdir: Path, seconds: float, seed: int = 14) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.seed = seed
        self.sock = workdir / "soak.sock"
        self.pki = workdir / "pki"
        self.figures = Figures()
        self._lock = threading.Lock()
        self._deadline = 0.0

    # --- bookkeeping --------------------------------------------------------------------
    def _done(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.figures.done[kind] += n

    def _error(self, name: str) -> None:
        with self._lock:
            self.figures.errors[name] += 1

    def _fail(self, what: str) -> None:
        with self._lock:
            self.figures.failures.append(what)

    def _running(self) -> bool:
        return time.monotonic() < self._deadline

    def uri(self, export: str = "", tls: bool = False) -> str:
        scheme = "nbds+unix" if tls else "nbd+unix"
        extra = f"&tls-certificates={self.pki / 'client'}" if tls else ""
        return f"{scheme}:///{export}?socket={self.sock}{extra}"

    # --- the clients ------------------------------------------------------------------------
    def fio(self, n: int) -> None:
        size = MAIN_SIZE // 4
        out = self.workdir / f"fio{n}.json"
        while self._running():
            result = subprocess.run(
                ["fio", "--name=soak", "--ioengine=nbd", f"--uri={self.uri()}",
                 "--rw=randwrite", "--bs=4k", f"--offset={n * size}", f"--size={size // 4}",
                 "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--output-format=json", f"--output={out}"],
                capture_output=True, text=True, timeout=120, check=False)
            if result.returncode != 0:
                self._fail(f"fio exited {result.returncode}: {result.stderr[-2000:]}")
                return
            job = json.loads(out.read_text())["jobs"][0]
            self._done("fio verify runs")
            self._done("fio requests", job["write"]["total_ios"] + job["read"]["total_ios"])

    def nbdcopy(self) -> None:
        rng = random.Random(self.seed)
        src, back = self.workdir / "src.img", self.workdir / "back.img"
        while self._running():
            src.write_bytes(rng.randbytes(COPY_SIZE))
            for args in ([str(src), self.uri("copy")], [self.uri("copy"), str(back)]):
                result = subprocess.run(["nbdcopy", *args], capture_output=True, text=True,
                                        timeout=120, check=False)
                if result.returncode != 0:
                    self._fail(f"nbdcopy {args}: {result.stderr}")
                    return
            if back.read_bytes() != src.read_bytes():
                self._fail("nbdcopy round trip: the data came back different")
                return
            self._done("nbdcopy round trips")

    def _raw_connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(self.sock))
        s.recv(18, socket.MSG_WAITALL)  # greeting: NBDMAGIC IHAVEOPT flags
        s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # EXPORT_NAME ""
        s.recv(10, socket.MSG_WAITALL)  # size and transmission flags
        return s

    def vanishing(self) -> None:
        rng = random.Random(self.seed + 1)
        while self._running():
            s = self._raw_connect()
            offset = rng.randrange((MAIN_SIZE - 2 * MiB) // 4096) * 4096
            if rng.random() < 0.5:
                # A WRITE whose payload stops half-way: it must never be executed.
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, offset, 65536)
                          + b"\xee" * 32768)
            else:
                for i in range(rng.randint(1, 32)):
                    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, offset,
                                          rng.choice((512, 65536, 1 << 20))))
            time.sleep(rng.uniform(0, 0.05))
            s.close()
            self._done("vanishing clients")

    def silent(self) -> None:
        rng = random.Random(self.seed + 2)
        held: list[tuple[float, socket.socket]] = []
        while self._running():
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(self.sock))
            # Half close themselves within 1 s, the others wait for --timeout (2 s).
            held.append((time.monotonic() + rng.choice((rng.uniform(0, 1), 30)), s))
            self._done("silent clients")
            time.sleep(0.05)
            now = time.monotonic()
            for item in [x for x in held if x[0] < now]:
                item[1].close()
                held.remove(item)
        for _, s in held:
            s.close()

    def tls(self) -> None:
        rng = random.Random(self.seed + 3)
        while self._running():
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_uri_allow_local_file(True)  # tls-certificates= in the URI
            h.connect_uri(self.uri(tls=True))
            for _ in range(50):
                offset = (MAIN_SIZE // 2 + rng.randrange(1024) * 4096)
                data = rng.randbytes(rng.choice((512, 4096, 65536)))
                h.pwrite(data, offset)
                if h.pread(len(data), offset) != data:
                    self._fail("TLS client: read back differs")
                self._done("TLS requests", 2)
            h.shutdown()
            self._done("TLS connections")

    def flaky(self, n: int) -> None:
        rng = random.Random(self.seed + 10 + n)
        region = FLAKY_SIZE // 4
        while self._running():
            h = nbd.NBD()
            h.connect_uri(self.uri("flaky"))
            known: dict[int, bytes] = {}
            for _ in range(200):
                offset = n * region + rng.randrange(region // 4096) * 4096
                op = rng.random()
                try:
                    if op < 0.45:
                        data = rng.randbytes(4096)
                        known.pop(offset, None)  # a failed write leaves it unknown
                        h.pwrite(data, offset)
                        known[offset] = data
                    elif op < 0.95:
                        got = h.pread(4096, offset)
                        if offset in known and got != known[offset]:
                            self._fail(f"flaky export: offset {offset} read back wrong")
                    else:
                        h.flush()
                    self._done("flaky requests")
                except nbd.Error as err:
                    name = err.errno or "disconnected"
                    self._error(name)
                    if name not in INJECTED:
                        self._fail(f"flaky export: {err}")
            h.shutdown()

    def reloader(self, proc: subprocess.Popen[bytes]) -> None:
        while self._running():
            time.sleep(1.0)
            proc.send_signal(signal.SIGHUP)
            self._done("reloads")

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> Figures:
        make_pki(self.pki)
        exports = self.workdir / "exports"
        exports.mkdir()
        for name, size in (("main", MAIN_SIZE), ("copy", COPY_SIZE), ("flaky", FLAKY_SIZE)):
            with open(exports / f"{name}.img", "wb") as f:
                f.truncate(size)
        stats = self.workdir / "stats.txt"
        log_path = self.workdir / "luanbd.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [LUANBD, "-f", "-U", str(self.sock), "--tls=on",
                 f"--tls-certificates={self.pki / 'server'}", "--timeout=2",
                 "--filter=stats", PLUGIN, f"dir={exports}", f"statsfile={stats}",
                 "statsappend=true"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir)
        try:
            self._wait_listening(proc)
            time.sleep(0.5)  # the probe connection's thread is gone
            rss, fds, threads = proc_status(proc.pid)
            f = self.figures
            f.rss_start, f.fds_start, f.threads_start = rss, fds, threads
            start = time.monotonic()
            self._deadline = start + self.seconds
            jobs: list[Callable[[], None]] = [
                lambda: self.fio(0), lambda: self.fio(1), self.nbdcopy, self.vanishing,
                self.silent, self.tls, lambda: self.flaky(0), lambda: self.flaky(1),
                lambda: self.reloader(proc)]
            threads_ = [threading.Thread(target=self._guard, args=(job,), daemon=True)
                        for job in jobs]
            for t in threads_:
                t.start()
            while self._running():
                time.sleep(min(SAMPLE, max(0.0, self._deadline - time.monotonic())))
                f.rss_samples.append(proc_status(proc.pid)[0])
            for t in threads_:
                t.join(180)
                if t.is_alive():
                    f.failures.append("a client did not finish")
            f.seconds = time.monotonic() - start
            # The last clients are gone; silent ones are cut off within --timeout.
            end = time.monotonic() + 15
            while True:
                rss, fds, threads = proc_status(proc.pid)
                if (fds, threads) == (f.fds_start, f.threads_start) or time.monotonic() > end:
                    break
                time.sleep(0.2)
            f.rss_end, f.fds_end, f.threads_end = rss, fds, threads
        finally:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(30)
        if status != 0:
            self.figures.failures.append(f"luanbd exited {status}")
        text = log_path.read_text(errors="replace")
        if "Traceback" in text:
            self.figures.failures.append(f"a Python traceback:\n{text[-3000:]}")
        for line in text.splitlines():
            if line.startswith("luanbd: error: "):
                self.figures.log_errors[_log_kind(line)] += 1
        for line in stats.read_text().splitlines():
            if line.startswith("total: "):
                self.figures.served += int(line.split()[1])
                self.figures.generations += 1
        return self.figures

    def _guard(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as err:  # reported as a failure of the run
            self._fail(f"{job}: {err!r}")

    def _wait_listening(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"luanbd exited {proc.returncode}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.sock))
                if s.recv(8) == b"NBDMAGIC":
                    return
            time.sleep(0.02)
        raise RuntimeError("luanbd did not listen")


def _log_kind(line: str) -> str:
    """A log line's kind: the callback of a random failure, or the handshake timeout."""
    if "failed at random" in line:
        return "random failure"
    if "--timeout" in line:
        return "handshake timeout"
    return line[len("luanbd: error: "):][:60]


__all__ = ["INJECTED", "Figures", "Soak", "errno"]
