#!/usr/bin/env python3
"""Bytes on the wire and time for copying a 90 % sparse 1 GiB disk (bench/sparse90.lua) with
a client that reads every byte (nbdcopy --no-extents) and one that asks for extents first
(nbdcopy): luanbd with and without --sparse-reads against nbdkit lua, over TCP on lo.

    python3 bench/sparse_reads.py [--repeat N]

Bytes are the loopback interface's received-bytes counter (/proc/net/dev) across the copy,
so both directions and TCP overhead count, the same way for every server.  Run it on a quiet
machine: the times are wall clock.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "sparse90.lua")
LUANBD = str(Path(sys.executable).parent / "luanbd")


def lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    raise SystemExit("no lo interface")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{argv[0]} did not listen")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    servers = {
        "nbdkit lua": ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "{port}", "lua", SCRIPT],
        "luanbd": [LUANBD, "-f", "-i", "127.0.0.1", "-p", "{port}", SCRIPT],
        "luanbd --sparse-reads": [LUANBD, "-f", "-i", "127.0.0.1", "-p", "{port}",
                                  "--sparse-reads", SCRIPT],
    }
    tmp = Path(tempfile.mkdtemp(prefix="sparse-bench-"))
    print("| server | client | MiB on the wire | seconds (best of %d) |" % args.repeat)
    print("|---|---|---|---|")
    try:
        for client in (["nbdcopy", "--no-extents"], ["nbdcopy"]):
            for name, argv in servers.items():
                port = free_port()
                proc = serve([a.replace("{port}", str(port)) for a in argv], port)
                best, wire = float("inf"), 0
                try:
                    for _ in range(args.repeat):
                        out = tmp / "copy.img"
                        before, start = lo_bytes(), time.monotonic()
                        subprocess.run([*client, f"nbd://127.0.0.1:{port}", str(out)],
                                       check=True)
                        best = min(best, time.monotonic() - start)
                        wire = lo_bytes() - before
                        os.unlink(out)
                finally:
                    proc.terminate()
                    proc.wait()
                print(f"| {name} | {' '.join(client)} | {wire / 2**20:.1f} | {best:.2f} |")
    finally:
        shutil.rmtree(tmp)


main()
