#!/usr/bin/env python3
"""Write the seed corpus of the fuzzers (fuzz/corpus/<harness>/) and fuzz/nbd.dict.

Seeds come from valid client sessions, two ways:

* recorded: real clients (libnbd's Python bindings, ``nbdinfo``, ``qemu-img``) talk to a
  ``luanbd`` ramdisk through a recording proxy, which keeps what the client sent;
* built: sessions written from the spec with fuzz/nbdwire.py, for what the installed
  clients cannot send (extended headers, STARTTLS, EXPORT_NAME, odd option orders).

Each session gives a handshake seed (a configuration header, then the whole client stream),
a requests seed (a session header, then the requests after the handshake) and a server seed
(the whole client stream, for fuzz_server.py).  The output is deterministic for the built
part; recording needs luanbd, nbdinfo and qemu-img (``--no-record`` skips it).

    python fuzz/make_corpus.py            # rewrites fuzz/corpus/ and fuzz/nbd.dict
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbdwire as w

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RAMDISK = ROOT / "examples" / "ramdisk.lua"
DISK_SIZE = 1 << 20

# Header bytes of the harness inputs (see the docstrings of fuzz_handshake/fuzz_requests).
HS_DEFAULT = bytes([0, 0, 0])        # FIXED|NO_ZEROES, everything on, TLS off; whole; seed 0
HS_CUT = bytes([0, 7, 1])            # same, cut in pieces of 1..8 bytes
HS_TLS_ON = bytes([0x20, 0, 0])
HS_TLS_REQUIRE = bytes([0x40, 3, 0])
HS_NO_SR = bytes([0x04 | 0x10, 0, 0])
#: READ_ONLY off, FLUSH, FUA, TRIM, WRITE_ZEROES, DF | CACHE, FAST_ZERO (what luanbd offers)
ALL_FLAGS = (1 | 4 | 8 | 32 | 64 | 128, 4 | 8)


def rq_header(*, extended: bool, structured: bool, base: bool, size_index: int = 2,
              use_buffer: bool = True, seed: int = 0) -> bytes:
    b0 = (extended * 1 | structured * 2 | base * 4 | size_index << 3 | use_buffer << 7)
    return bytes([b0, *ALL_FLAGS, seed])


def split_session(stream: bytes) -> tuple[bytes, bytes, bool]:
    """(handshake part, request part, extended headers asked for) of a client stream."""
    at = 4
    extended = False
    while len(stream) - at >= w.OPTION_HEADER.size:
        _, opt, length = w.OPTION_HEADER.unpack_from(stream, at)
        at += w.OPTION_HEADER.size + length
        if opt == w.OPT_EXTENDED_HEADERS:
            extended = True
        if opt in (w.OPT_GO, w.OPT_EXPORT_NAME, w.OPT_ABORT):
            break
    return stream[:at], stream[at:], extended


# --- recording real clients -------------------------------------------------------------------
@contextlib.contextmanager
def luanbd_server(workdir: Path) -> Iterator[Path]:
    sock = workdir / "luanbd.sock"
    luanbd = shutil.which("luanbd") or str(Path(sys.executable).parent / "luanbd")
    proc = subprocess.Popen([luanbd, "-f", "-U", str(sock), str(RAMDISK), f"size={DISK_SIZE}"],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("luanbd did not start")
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(20)


def record(server: Path, workdir: Path, run_client: list[str] | None,
           py_client: str | None = None) -> bytes:
    """What one client sent, relayed through a proxy socket to ``server``."""
    proxy = workdir / "proxy.sock"
    with contextlib.suppress(FileNotFoundError):
        proxy.unlink()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(proxy))
    listener.listen(1)
    sent = bytearray()

    def relay() -> None:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(str(server))
        with client, upstream:
            peers = {client: upstream, upstream: client}
            while True:
                ready, _, _ = select.select(list(peers), [], [], 10)
                if not ready:
                    return
                for s in ready:
                    data = s.recv(1 << 20)
                    if not data:
                        return
                    if s is client:
                        sent.extend(data)
                    peers[s].sendall(data)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    uri = f"nbd+unix:///?socket={proxy}"
    if run_client is not None:
        subprocess.run([*run_client, uri] if "{uri}" not in run_client
                       else [a.replace("{uri}", uri) for a in run_client],
                       check=True, capture_output=True, timeout=60)
    if py_client is not None:
        done = subprocess.run(["/usr/bin/python3", "-c", py_client, str(proxy)], check=False,
                              capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"recording client failed:\n{done.stderr}")
    thread.join(15)
    listener.close()
    return bytes(sent)


LIBNBD_SESSION = """
import sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_unix(sys.argv[1])
h.pwrite(b"seed" * 1024, 8192)
h.pread(4096, 8192)
h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)
h.flush()
h.trim(4096, 65536)
h.zero(8192, 16384)
h.zero(4096, 32768, nbd.CMD_FLAG_NO_HOLE)
h.block_status(65536, 0, lambda *a: 0)
h.shutdown()
"""
LIBNBD_PLAIN = """
import sys, nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_unix(sys.argv[1])
h.pread(4096, 0)
h.pwrite(b"y" * 100, 1000)
h.shutdown()
"""
LIBNBD_OLD_CLIENT = """
import sys, nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sys.argv[1])
h.opt_list(lambda name, desc: 0)
h.opt_info()
h.opt_list_meta_context(lambda name: 0)
h.opt_abort()
"""


def recorded_sessions(workdir: Path) -> list[tuple[str, bytes]]:
    sessions: list[tuple[str, bytes]] = []
    with luanbd_server(workdir) as server:
        for name, script in (("libnbd-session", LIBNBD_SESSION),
                             ("libnbd-no-sr", LIBNBD_PLAIN),
                             ("libnbd-opt-mode", LIBNBD_OLD_CLIENT)):
            sessions.append((name, record(server, workdir, None, script)))
        if shutil.which("nbdinfo"):
            sessions.append(("nbdinfo-list", record(server, workdir, ["nbdinfo", "--list"])))
            sessions.append(("nbdinfo-map", record(server, workdir, ["nbdinfo", "--map"])))
        if shutil.which("qemu-img"):
            sessions.append(("qemu-img-info",
                             record(server, workdir, ["qemu-img", "info", "{uri}"])))
    return sessions


# --- built sessions ----------------------------------------------------------------------------
def built_sessions() -> list[tuple[str, bytes, bytes]]:
    """(name, handshake config header, stream) of hand-built sessions."""
    out: list[tuple[str, bytes, bytes]] = []

    s = w.Session()
    s.parts.append(w.Part("flags", w.client_flags()))
    for opt in (w.OPT_STRUCTURED_REPLY, w.OPT_EXTENDED_HEADERS):
        s.add_option(opt)
    s.add_option(w.OPT_SET_META_CONTEXT, w.meta_payload(b"", [w.BASE_ALLOCATION]))
    s.add_option(w.OPT_GO, w.info_payload(b"", [w.INFO_BLOCK_SIZE]))
    s.extended = s.structured = True
    s.add_request(w.CMD_WRITE, cookie=1, offset=4096, length=16, data=b"extended headers")
    s.add_request(w.CMD_WRITE, flags=w.FLAG_PAYLOAD_LEN, cookie=2, offset=0, length=4,
                  data=b"abcd")
    s.add_request(w.CMD_READ, cookie=3, offset=4096, length=16)
    s.add_request(w.CMD_BLOCK_STATUS, cookie=4, offset=0, length=1 << 20)
    s.add_request(w.CMD_DISC, cookie=5)
    out.append(("built-extended", HS_DEFAULT, s.wire()))

    s = w.Session()
    s.parts.append(w.Part("flags", w.client_flags(w.FLAG_C_FIXED_NEWSTYLE)))
    s.add_option(w.OPT_EXPORT_NAME, b"")
    s.add_request(w.CMD_READ, cookie=1, offset=0, length=512)
    s.add_request(w.CMD_WRITE, cookie=2, offset=512, length=8, data=b"12345678")
    s.add_request(w.CMD_DISC, cookie=3)
    out.append(("built-export-name", HS_CUT, s.wire()))

    s = w.Session()
    s.parts.append(w.Part("flags", w.client_flags()))
    s.add_option(w.OPT_STARTTLS)
    out.append(("built-starttls", HS_TLS_ON, s.wire()))

    s = w.Session()
    s.parts.append(w.Part("flags", w.client_flags()))
    s.add_option(w.OPT_INFO, w.info_payload())
    s.add_option(w.OPT_STARTTLS)
    out.append(("built-tls-require", HS_TLS_REQUIRE, s.wire()))

    s = w.Session()
    s.parts.append(w.Part("flags", w.client_flags()))
    s.add_option(w.OPT_PEEK_EXPORT, b"junk")
    s.add_option(w.OPT_STRUCTURED_REPLY)
    s.add_option(w.OPT_LIST_META_CONTEXT, w.meta_payload(b"", [b"base:"]))
    s.add_option(w.OPT_LIST)
    s.add_option(w.OPT_GO, w.info_payload(b"", [w.INFO_NAME, w.INFO_DESCRIPTION]))
    out.append(("built-no-sr", HS_NO_SR, s.wire()))

    # Random valid sessions, kept only if luanbd's handshake machine (answering as the
    # harness does) takes them to transmission: seeds should be sessions that work.
    from fuzz_handshake import decode, run_handshake

    from luanbd.protocol.handshake import ServerHandshake

    rng = random.Random(20260)
    while sum(name.startswith("built-random") for name, _, _ in out) < 4:
        s = w.valid_session(rng, DISK_SIZE, max_requests=4, max_length=512)
        header = bytes([0, rng.choice([0, 5]), rng.randrange(256)])
        config, _, answers, stream = decode(header + s.wire())
        if run_handshake(ServerHandshake, config, [stream], answers).requests:
            n = sum(name.startswith("built-random") for name, _, _ in out)
            out.append((f"built-random-{n}", header, s.wire()))
    return out


# --- writing --------------------------------------------------------------------------------
DICT_ENTRIES = {
    "nbdmagic": struct.pack(">Q", w.NBDMAGIC),
    "ihaveopt": struct.pack(">Q", w.IHAVEOPT),
    "request_magic": struct.pack(">I", w.REQUEST_MAGIC),
    "extended_request_magic": struct.pack(">I", w.EXTENDED_REQUEST_MAGIC),
    "base_allocation": w.BASE_ALLOCATION,
    "base_namespace": b"base:",
    "max_request": struct.pack(">I", w.MAX_REQUEST_SIZE),
    "max_request_plus_1": struct.pack(">I", w.MAX_REQUEST_SIZE + 1),
    "u32_max": b"\xff\xff\xff\xff",
    "option_go": struct.pack(">Q", w.IHAVEOPT) + struct.pack(">I", w.OPT_GO),
    "option_set_meta": struct.pack(">Q", w.IHAVEOPT) + struct.pack(">I", w.OPT_SET_META_CONTEXT),
}


def write(directory: Path, name: str, data: bytes) -> None:
    digest = hashlib.sha1(data).hexdigest()[:8]
    (directory / f"{name}-{digest}").write_bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "corpus")
    parser.add_argument("--no-record", action="store_true", help="only the built sessions")
    args = parser.parse_args()
    dirs = {name: args.out / name for name in ("handshake", "requests", "server")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)

    sessions = [(name, HS_DEFAULT, stream) for name, stream in
                ([] if args.no_record else recorded_sessions(Path(tempfile.mkdtemp())))]
    sessions += built_sessions()
    for name, config, stream in sessions:
        write(dirs["handshake"], name, config + stream)
        write(dirs["server"], name, stream)
        _, requests, extended = split_session(stream)
        if requests:
            base = b"base:allocation" in stream
            # every other seed is cut in pieces (byte 3), the others parsed whole
            cut = len(list(dirs["requests"].iterdir())) % 2
            header = rq_header(extended=extended, structured=True, base=base, seed=9 * cut)
            write(dirs["requests"], name, header + requests)
    # A few streams of requests alone: every command, with each flag once.
    ext_s = w.Session(extended=True)
    classic = w.Session()
    for s in (classic, ext_s):
        for cookie, (cmd, flags) in enumerate([(w.CMD_READ, w.FLAG_DF), (w.CMD_FLUSH, 0),
                                               (w.CMD_TRIM, w.FLAG_FUA),
                                               (w.CMD_WRITE_ZEROES, w.FLAG_FAST_ZERO),
                                               (w.CMD_CACHE, 0),
                                               (w.CMD_BLOCK_STATUS, w.FLAG_REQ_ONE)]):
            flush = cmd == w.CMD_FLUSH
            s.add_request(cmd, flags=flags, cookie=cookie, offset=0 if flush else 512,
                          length=0 if flush else 4096)
        s.add_request(w.CMD_WRITE, cookie=9, offset=w.MAX_REQUEST_SIZE,
                      length=w.MAX_REQUEST_SIZE + 1)
        header = rq_header(extended=s.extended, structured=True, base=True, use_buffer=False,
                           seed=3)
        write(dirs["requests"], "built-commands" + ("-ext" if s.extended else ""),
              header + s.wire())

    with (HERE / "nbd.dict").open("w") as f:
        f.write("# libFuzzer dictionary of NBD magics and limits (written by make_corpus.py)\n")
        for key, value in DICT_ENTRIES.items():
            escaped = "".join(f"\\x{b:02x}" for b in value)
            f.write(f'{key}="{escaped}"\n')
    for name, d in dirs.items():
        files = list(d.iterdir())
        print(f"{name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
