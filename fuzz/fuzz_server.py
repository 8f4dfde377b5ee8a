#!/usr/bin/env python3
"""Whole-server fuzz run over a Unix socket: a real ``luanbd`` process serving
examples/ramdisk.lua gets mutated client sessions on fresh connections, one after another.

Each input is a client stream (flags, options, requests) from a valid session, built by
fuzz/nbdwire.py or taken from fuzz/corpus/server/, then mutated: parts dropped, repeated,
swapped or inserted; option and request length fields set to limits (0, 64 MiB + 1,
2**32 - 1, ...); offsets, commands, flags changed; bit flips, truncation, splices.  The
client sends it (reading whatever the server answers), half-closes, and waits for the server
to close the connection.

Findings:

* the server does not send the greeting, or does not close within 5 s after the client's EOF;
* a ``Traceback`` or ``internal error`` appears in the server's stderr (saved with the input
  that was being sent);
* after every batch: the server process died, or a fresh real client (libnbd's Python
  bindings) cannot read back the canary written at the start, or cannot write and read
  back a probe;
* at the end: the server does not exit 0 on SIGTERM.

The canary and probe live in the last 64 KiB of the disk; an input that holds a request
header (classic or extended) whose range reaches that region is skipped, so that only a
server bug can change the canary.

    python fuzz/fuzz_server.py --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbdwire as w

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RAMDISK = ROOT / "examples" / "ramdisk.lua"
#: The fuzzed requests aim at [0, FUZZ_SIZE); the canary and the probe sit after it.
FUZZ_SIZE = 1 << 20
PROTECTED = 64 * 1024
DISK_SIZE = FUZZ_SIZE + PROTECTED
CANARY_AT = FUZZ_SIZE
CANARY_LEN = 32 * 1024
PROBE_AT = FUZZ_SIZE + CANARY_LEN
PROBE_LEN = 4096
#: Seconds the server has to close a connection after the client's EOF.
CLOSE_TIMEOUT = 5.0
#: Seconds between liveness checks with a real client.
CHECK_EVERY = 1.0
BAD_LOG = ("Traceback", "internal error")
GREETING_PREFIX = w.NBDMAGIC.to_bytes(8, "big") + w.IHAVEOPT.to_bytes(8, "big")


@dataclass
class Stats:
    inputs: int = 0
    connections: int = 0
    skipped: int = 0
    checks: int = 0
    bytes_sent: int = 0
    #: Findings counted with their repeats.
    occurrences: int = 0
    #: How connections ended: "eof" (the server closed), "reset", "timeout".
    endings: dict[str, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)


def luanbd_command() -> str:
    return shutil.which("luanbd") or str(Path(sys.executable).parent / "luanbd")


def make_certificates(directory: Path) -> bool:
    """A self-signed server certificate in nbdkit's layout, if openssl is installed."""
    if shutil.which("openssl") is None:
        return False
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", "server-key.pem", "-out", "server-cert.pem", "-days", "2",
                    "-subj", "/CN=localhost"], cwd=directory, check=True, capture_output=True,
                   timeout=60)
    shutil.copy(directory / "server-cert.pem", directory / "ca-cert.pem")
    return True


def exchange(path: Path, data: bytes) -> tuple[bytes, str]:
    """Send ``data`` on a fresh connection (reading the answers meanwhile), half-close, and
    read until the server closes.  Returns (what the server sent, how it ended: "eof",
    "reset" or "timeout").  A server that stops reading (it closed on a protocol violation)
    ends the sending; what it sent before is still read."""
    sock = socket.socket(socket.AF_UNIX)
    received = bytearray()
    try:
        sock.connect(str(path))
        sock.setblocking(False)
        view = memoryview(data)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        shut = False
        while True:
            if not view and not shut:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                shut = True
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(received), "timeout"
            readable, writable, _ = select.select([sock], [sock] if view else [], [], left)
            if readable:
                try:
                    chunk = sock.recv(1 << 20)
                except ConnectionResetError:
                    return bytes(received), "reset"
                if not chunk:
                    return bytes(received), "eof"
                received += chunk
            if writable and view:
                try:
                    view = view[sock.send(view[:65536]):]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    view = view[:0]  # the server closed its end: read what it sent
    finally:
        sock.close()


class Fuzzer:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.sock = workdir / "fuzz.sock"
        self.log_path = workdir / "luanbd.log"
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        self.artifacts: Path = args.artifacts
        self.canary = self.rng.randbytes(CANARY_LEN)
        self.seeds = [p.read_bytes() for p in sorted(args.corpus.iterdir())] \
            if args.corpus.is_dir() else []
        self.log_at = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: BinaryIO | None = None
        #: Inputs sent since the last good check with a real client.
        self.batch: list[bytes] = []
        self.bad_seen: set[str] = set()

    # --- the server ---------------------------------------------------------------------
    def start(self) -> None:
        options = ["-f", "-U", str(self.sock)]
        if self.args.verbose:
            options.append("-v")
        certs = self.workdir / "pki"
        certs.mkdir()
        if self.args.tls and make_certificates(certs):
            options += ["--tls=on", f"--tls-certificates={certs}"]
        command = [luanbd_command(), *options, str(self.args.script), f"size={DISK_SIZE}"]
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fuzz_server: luanbd did not start:\n{self.read_log()}")
            time.sleep(0.05)
        import nbd

        h = nbd.NBD()
        h.connect_unix(str(self.sock))
        h.pwrite(self.canary, CANARY_AT)
        h.shutdown()

    def stop(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                status = self.proc.wait()
                self.finding("luanbd did not exit within 20 s of SIGTERM", b"")
            if status != 0:
                self.finding(f"luanbd exited with status {status} after SIGTERM", b"")
        assert self.log is not None
        self.log.close()
        text = self.read_log()
        if self.args.keep_log:
            shutil.copy(self.log_path, self.args.keep_log)
        for bad in BAD_LOG:
            if bad in text and bad not in self.bad_seen:  # not pinned on an input yet
                self.finding(f"'{bad}' in luanbd's stderr", b"", text[-3000:])

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def new_log(self) -> str:
        with self.log_path.open("rb") as f:
            f.seek(self.log_at)
            text = f.read()
        self.log_at += len(text)
        return text.decode(errors="replace")

    # --- findings -----------------------------------------------------------------------
    def finding(self, what: str, data: bytes, detail: str = "") -> None:
        """Record a finding; ``data`` is its input, else the inputs sent since the last good
        check are kept (one of them did it).  Repeats (same text but for numbers) are only
        counted."""
        self.stats.occurrences += 1
        key = re.sub(r"[0-9]+", "N", what)
        if key in self.stats.findings:
            return
        self.stats.findings.append(key)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        if data:
            name = f"server-{hashlib.sha1(data).hexdigest()}"
            (self.artifacts / name).write_bytes(data)
        else:
            name = f"batch-{len(self.stats.findings)}"
            batch = self.artifacts / name
            batch.mkdir()
            for i, sent in enumerate(self.batch):
                (batch / f"{i:05d}").write_bytes(sent)
        with (self.artifacts / "findings.txt").open("a") as f:
            f.write(f"server: {what}\t{name}\n")
        print(f"\n=== FINDING (server): {what} [{self.artifacts / name}]", file=sys.stderr)
        if data:
            print(f"input ({len(data)} bytes): {data.hex()}", file=sys.stderr)
        if detail:
            print(detail, file=sys.stderr)

    # --- inputs -------------------------------------------------------------------------
    def next_input(self) -> bytes:
        rng = self.rng
        choice = rng.random()
        if choice < 0.2 and self.seeds:
            return w.mutate_bytes(rng, rng.choice(self.seeds))
        session = w.valid_session(rng, FUZZ_SIZE)
        parts = session.parts
        if choice < 0.9:
            parts = w.mutate_parts(rng, parts)
        data = b"".join(p.data for p in parts)
        if choice >= 0.6 and choice < 0.9:
            data = w.mutate_bytes(rng, data)
        return data

    def touches_protected(self, data: bytes) -> bool:
        return any(offset < DISK_SIZE and offset + length > FUZZ_SIZE
                   for _, _, offset, length in w.request_headers(data))

    # --- checks -------------------------------------------------------------------------
    def check_server(self) -> bool:
        """A real client still reads the canary and can write and read a probe."""
        assert self.proc is not None
        self.stats.checks += 1
        if self.proc.poll() is not None:
            self.finding(f"luanbd died (status {self.proc.returncode})", b"",
                         self.read_log()[-3000:])
            return False
        import nbd

        probe = self.rng.randbytes(PROBE_LEN)
        try:
            h = nbd.NBD()
            h.connect_unix(str(self.sock))
            canary = h.pread(CANARY_LEN, CANARY_AT)
            h.pwrite(probe, PROBE_AT)
            back = h.pread(PROBE_LEN, PROBE_AT)
            h.shutdown()
        except nbd.Error as err:
            self.finding(f"a real client failed: {err}", b"")
            return False
        if canary != self.canary:
            self.finding("the canary written at the start reads back changed", b"")
            return False
        if back != probe:
            self.finding("a probe write did not read back", b"")
            return False
        return True

    def run(self) -> Stats:
        self.start()
        stats = self.stats
        start = time.monotonic()
        end = start + self.args.seconds
        next_check = start + CHECK_EVERY
        self.new_log()
        try:
            while time.monotonic() < end:
                data = self.next_input()
                if self.touches_protected(data):
                    stats.skipped += 1
                    continue
                stats.inputs += 1
                stats.connections += 1
                stats.bytes_sent += len(data)
                self.batch.append(data)
                received, how = exchange(self.sock, data)
                stats.endings[how] = stats.endings.get(how, 0) + 1
                if not received.startswith(GREETING_PREFIX):
                    self.finding(f"no greeting (got {received[:18].hex()}, {how})", data)
                if how == "timeout":
                    self.finding(f"connection not closed {CLOSE_TIMEOUT:g} s after EOF", data)
                text = self.new_log()
                for bad in BAD_LOG:
                    if bad in text:
                        self.bad_seen.add(bad)
                        lines = [line for line in text.splitlines() if bad in line]
                        self.finding(f"'{bad}' in stderr: {lines[0][:200]}", data, text[-3000:])
                        break
                if time.monotonic() >= next_check:
                    if not self.check_server():
                        break
                    self.batch.clear()
                    next_check = time.monotonic() + CHECK_EVERY
            else:
                self.check_server()
        finally:
            self.stop()
        elapsed = time.monotonic() - start
        print(f"server: {stats.inputs} inputs, {len(stats.findings)} findings "
              f"({stats.connections} connections, {stats.checks} real-client checks, "
              f"{stats.skipped} inputs skipped for touching the canary, "
              f"{stats.occurrences} finding occurrences, endings {stats.endings}, "
              f"{stats.bytes_sent} bytes sent, {stats.inputs / max(elapsed, 1e-9):.0f} inputs/s)")
        return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--script", type=Path, default=RAMDISK,
                        help="Lua plugin to serve (given size=N)")
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus" / "server")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-findings"),
                        help="where inputs of findings are written")
    parser.add_argument("--keep-log", type=Path, help="copy luanbd's stderr to this file")
    parser.add_argument("--no-tls", dest="tls", action="store_false",
                        help="do not offer STARTTLS (default: --tls=on with a test certificate)")
    parser.add_argument("--quiet", dest="verbose", action="store_false",
                        help="run luanbd without -v (no tracebacks for internal errors)")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    print(f"fuzz_server: seed {args.seed}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lnbd-fuzz-") as tmp:
        stats = Fuzzer(args, Path(tmp)).run()
    return 1 if stats.findings else 0


if __name__ == "__main__":
    sys.exit(main())
