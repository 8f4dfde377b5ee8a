"""Failures and hostile clients: Lua errors in data callbacks, stalled and vanishing clients,
malformed requests on a raw socket.  After each one the server must keep serving, usually
on the very same connection.

nbdkit is not the oracle for the stalled-client test: its Lua plugin holds one lock through
the whole handshake, so a silent client there blocks everyone.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest
from luanbd_procs import (
    CMD_READ,
    CMD_WRITE,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    REP_ACK,
    REP_ERR_UNSUP,
    RawClient,
    Server,
    StartServer,
    client_env,
    line_of,
    run_client,
    script,
    where,
)

DISK = script("disk.lua")
SPARSE2 = script("sparse2.lua")

MiB = 1024 * 1024
MAX_REQUEST = 64 * MiB
CMD_WRITE_ZEROES = 6


def connect(server: Server) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri)
    return h


# --- Lua errors in data callbacks -------------------------------------------------------------

def _fail_and_recover(h: nbd.NBD, op: str) -> None:
    """Run ``op`` twice: the first call fails in Lua (failonce), the second works."""
    data = b"R" * 4096
    calls = {
        "pread": lambda: h.pread(4096, 8192),
        "pwrite": lambda: h.pwrite(data, 8192),
        "flush": h.flush,
        "trim": lambda: h.trim(4096, 8192),
        "zero": lambda: h.zero(4096, 8192),
    }
    if op in ("pread", "flush", "trim", "zero"):
        h.pwrite(data, 8192)
    with pytest.raises(nbd.Error) as failure:
        calls[op]()
    assert failure.value.errno == "EIO"
    assert failure.value.errnum == errno.EIO
    # The failed call changed nothing.
    expected = bytes(4096) if op == "pwrite" else data
    assert h.pread(4096, 8192) == expected
    # The same connection works, the same callback included.
    calls[op]()
    expected = bytes(4096) if op in ("trim", "zero") else data
    assert h.pread(4096, 8192) == expected
    h.pwrite(b"after" * 100, 100000)
    assert h.pread(500, 100000) == b"after" * 100


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["pread", "pwrite", "flush", "trim", "zero"])
def test_lua_error_gives_eio_and_connection_keeps_working(start_server: StartServer,
                                                         op: str) -> None:
    server = start_server(DISK, f"failonce={op}")
    h = connect(server)
    _fail_and_recover(h, op)
    h.shutdown()
    line = line_of(DISK, f'error("{op} failed")')
    assert server.errors() == [f"luanbd: error: {op}: {where(DISK, line)}: {op} failed"]


@pytest.mark.timeout(60)
def test_lua_error_seen_by_a_client_process(start_server: StartServer) -> None:
    # The same through nbdsh, a separate process: the error reaches it as EIO.
    server = start_server(DISK, "failonce=pread")
    code = ("try:\n    h.pread(512, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n"
            "print(h.pread(4, 0))")
    out = run_client(["nbdsh", "-u", server.uri, "-c", code]).stdout
    assert out == "EIO\nbytearray(b'\\x00\\x00\\x00\\x00')\n"


# --- clients that stall or vanish -------------------------------------------------------------

def _stall(sock_path: Path, stage: str) -> socket.socket:
    """A client that stops talking at ``stage`` of the handshake, socket left open."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock_path))
    if stage == "connected":
        return s
    greeting = b""
    while len(greeting) < 18:
        greeting += s.recv(18 - len(greeting))
    if stage == "greeting-read":
        return s
    s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    if stage == "flags-sent":
        return s
    # Half an option header: the server is waiting for the rest.
    s.sendall(struct.pack(">Q", IHAVEOPT) + b"\0\0")
    return s


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["connected", "greeting-read", "flags-sent",
                                   "mid-option"])
def test_silent_client_does_not_block_others(start_server: StartServer, stage: str) -> None:
    server = start_server(DISK, "size=2M")
    assert server.sock is not None
    stalled = [_stall(server.sock, stage) for _ in range(3)]
    try:
        start = time.monotonic()
        info = run_client(["nbdinfo", "--size", server.uri], timeout=10)
        assert info.stdout == "2097152\n"
        code = "h.pwrite(b'ok' * 256, 0); assert h.pread(512, 0) == b'ok' * 256"
        run_client(["nbdsh", "-u", server.uri, "-c", code], timeout=10)
        assert time.monotonic() - start < 5
    finally:
        for s in stalled:
            s.close()


@pytest.mark.timeout(60)
def test_silent_client_in_transmission_does_not_block_others(start_server: StartServer) -> None:
    server = start_server(DISK)
    idle = connect(server)
    idle.pwrite(b"i" * 512, 0)
    start = time.monotonic()
    assert run_client(["nbdinfo", "--size", server.uri], timeout=10).stdout == "1048576\n"
    assert time.monotonic() - start < 5
    assert idle.pread(512, 0) == b"i" * 512


VANISH = """
import os, sys
import nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
size = 2 * 1024 * 1024
for i in range(6):
    h.aio_pread(nbd.Buffer(size), i * size)
h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"v" * size)), 12 * size)
h.aio_pread(nbd.Buffer(size), 0)
print(h.aio_in_flight(), flush=True)
os._exit(0)  # no NBD_CMD_DISC, no close: the process is simply gone
"""


@pytest.mark.timeout(60)
def test_client_vanishing_with_requests_in_flight(start_server: StartServer) -> None:
    server = start_server(DISK, "size=64M")
    assert server.sock is not None
    for _ in range(4):
        result = subprocess.run([sys.executable, "-c", VANISH, str(server.sock)],
                                capture_output=True, text=True, timeout=30,
                                env=client_env(), check=False)
        assert result.returncode == 0, result.stderr
        assert int(result.stdout) > 0  # requests were still in flight at exit
        assert server.alive()
    h = connect(server)
    h.pwrite(b"still here" * 100, 5 * MiB)
    assert h.pread(1000, 5 * MiB) == b"still here" * 100
    h.shutdown()
    assert server.alive()
    assert server.errors() == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_concurrent_fio_clients(start_server: StartServer) -> None:
    # Four fio jobs, each with its own connection and its own 4 MiB region, verified.
    server = start_server(SPARSE2, "size=16M")
    result = run_client([
        "fio", "--name=multi", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randrw",
        "--bs=4k", "--iodepth=8", "--numjobs=4", "--size=4M", "--offset_increment=4M",
        "--verify=crc32c", "--verify_fatal=1", "--output-format=json",
    ], timeout=100)
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert len(report["jobs"]) == 4
    assert [job["error"] for job in report["jobs"]] == [0, 0, 0, 0]
    assert all(job["write"]["io_bytes"] > 0 for job in report["jobs"])
    assert server.errors() == []


# --- malformed input on a raw socket ----------------------------------------------------------

@pytest.mark.timeout(60)
def test_bad_request_magic_closes_only_that_connection(start_server: StartServer) -> None:
    server = start_server(DISK)
    assert server.sock is not None
    with RawClient(server.sock) as bad, RawClient(server.sock) as good:
        bad.connect_export()
        good.connect_export()
        assert good.write(0, b"g" * 512) == 0
        bad.send_request(CMD_READ, 0, 512, magic=0x12345678)
        assert bad.closed_by_server()
        assert good.read(0, 512) == (0, b"g" * 512)
    (line,) = server.errors()
    assert line.startswith("luanbd: error: ")
    assert line.endswith("invalid request: 'magic' field is incorrect (0x12345678)")
    assert run_client(["nbdinfo", "--size", server.uri]).stdout == "1048576\n"


@pytest.mark.timeout(60)
def test_oversize_read_gets_enomem(start_server: StartServer) -> None:
    server = start_server(DISK, "size=128M")
    assert server.sock is not None
    with RawClient(server.sock, timeout=30) as c:
        c.connect_export()
        assert c.size == 128 * MiB
        assert c.write(4096, b"w" * 512) == 0
        assert c.read(0, MAX_REQUEST + 1) == (errno.ENOMEM, b"")
        # The next request on the same connection works ...
        assert c.read(4096, 512) == (0, b"w" * 512)
        # ... and so does a read of exactly the limit.
        error, data = c.read(0, MAX_REQUEST)
        assert error == 0
        assert len(data) == MAX_REQUEST
        assert data[4096:4608] == b"w" * 512
        # The range check comes first: too big and past the end is EINVAL.
        assert c.read(100 * MiB, MAX_REQUEST + 1) == (errno.EINVAL, b"")
        assert c.read(4096, 4) == (0, b"wwww")
    assert server.errors() == [
        "luanbd: error: invalid request: NBD_CMD_READ: data request is too large "
        "(67108865 > 67108864)",
        f"luanbd: error: invalid request: NBD_CMD_READ: offset and count are out of range: "
        f"offset={100 * MiB} count={MAX_REQUEST + 1}",
    ]


@pytest.mark.timeout(60)
def test_oversize_write_gets_enomem(start_server: StartServer) -> None:
    server = start_server(DISK, "size=128M")
    assert server.sock is not None
    with RawClient(server.sock, timeout=30) as c:
        c.connect_export()
        payload = b"O" * (MAX_REQUEST + 4096)
        # The payload is read and thrown away, so the stream stays in step.
        assert c.write(0, payload) == errno.ENOMEM
        assert c.write(8192, b"n" * 1024) == 0
        assert c.read(8192, 1024) == (0, b"n" * 1024)
        # Nothing of the refused write reached the disk.
        assert c.read(0, 8192) == (0, bytes(8192))
    assert server.errors() == [
        "luanbd: error: invalid request: NBD_CMD_WRITE: data request is too large "
        f"({MAX_REQUEST + 4096} > {MAX_REQUEST})"]


@pytest.mark.timeout(60)
def test_unknown_command_gets_einval(start_server: StartServer) -> None:
    server = start_server(DISK)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        c.send_request(99, 0, 512, cookie=42)
        assert c.reply() == (errno.EINVAL, 42, b"")
        assert c.write(0, b"u" * 512, cookie=43) == 0
        assert c.read(0, 512, cookie=44) == (0, b"u" * 512)
    assert server.errors() == ["luanbd: error: invalid request: unknown command (99) ignored"]


@pytest.mark.timeout(60)
def test_unknown_flag_gets_einval(start_server: StartServer) -> None:
    server = start_server(DISK)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        c.send_request(CMD_READ, 0, 512, flags=0x80, cookie=7)
        assert c.reply() == (errno.EINVAL, 7, b"")
        assert c.read(0, 4, cookie=8) == (0, bytes(4))
    (line,) = server.errors()
    assert line.endswith("unknown flag (0x80)")


@pytest.mark.timeout(60)
def test_33_unknown_options_disconnect(start_server: StartServer) -> None:
    server = start_server(DISK)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.start()
        for _ in range(32):
            c.send_option(99, b"abc")
            option, reply, _ = c.option_reply()
            assert (option, reply) == (99, REP_ERR_UNSUP)
        c.send_option(99, b"abc")
        assert c.closed_by_server()
    (line,) = server.errors()
    assert line.endswith("client spent too much time negotiating without selecting an export")
    assert run_client(["nbdinfo", "--size", server.uri]).stdout == "1048576\n"


@pytest.mark.timeout(60)
def test_32_options_then_go_is_fine(start_server: StartServer) -> None:
    server = start_server(DISK)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.start()
        for _ in range(31):
            c.send_option(99)
            assert c.option_reply()[1] == REP_ERR_UNSUP
        assert c.go() == REP_ACK
        assert c.read(0, 8) == (0, bytes(8))
    assert server.errors() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["client-flags", "option-magic"])
def test_bad_handshake_closes_only_that_connection(start_server: StartServer,
                                                   what: str) -> None:
    server = start_server(DISK)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.greeting()
        if what == "client-flags":
            c.sock.sendall(struct.pack(">I", 0x80))
        else:
            c.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            c.sock.sendall(struct.pack(">QII", 0x1122334455667788, 7, 0))
        assert c.closed_by_server()
    assert len(server.errors()) == 1
    assert run_client(["nbdinfo", "--size", server.uri]).stdout == "1048576\n"


@pytest.mark.timeout(60)
def test_write_on_readonly_export_gets_eperm(start_server: StartServer) -> None:
    server = start_server(DISK, options=["-r"])
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        assert c.eflags & 2  # NBD_FLAG_READ_ONLY
        assert c.write(0, b"x" * 512, cookie=5) == errno.EPERM
        c.send_request(CMD_WRITE_ZEROES, 0, 512, cookie=6)
        assert c.reply() == (errno.EPERM, 6, b"")
        assert c.read(0, 512) == (0, bytes(512))
    assert server.errors() == [
        "luanbd: error: invalid request: NBD_CMD_WRITE: write request on readonly connection",
        "luanbd: error: invalid request: NBD_CMD_WRITE_ZEROES: write request on readonly "
        "connection",
    ]


@pytest.mark.timeout(60)
def test_write_on_readonly_export_with_libnbd(start_server: StartServer) -> None:
    server = start_server(DISK, options=["-r"])
    h = nbd.NBD()
    h.set_strict_mode(0)  # let libnbd send what a read-only export must refuse
    h.connect_uri(server.uri)
    assert h.is_read_only()
    for call in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0)):
        with pytest.raises(nbd.Error) as failure:
            call()
        assert failure.value.errno == "EPERM"
    assert h.pread(512, 0) == bytes(512)
    assert len(server.errors()) == 2
    assert all(line.endswith(": write request on readonly connection")
               for line in server.errors())


@pytest.mark.timeout(60)
def test_short_write_payload_then_eof(start_server: StartServer) -> None:
    # A client that promises a 1 MiB write, sends part of it and goes away.
    server = start_server(DISK)
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        c.send_request(CMD_WRITE, 0, MiB, data=b"p" * 1000)
    assert run_client(["nbdinfo", "--size", server.uri]).stdout == "1048576\n"
    # Nothing of the incomplete write reached the disk.
    out = run_client(["nbdsh", "-u", server.uri, "-c", "print(h.pread(1000, 0) == bytes(1000))"])
    assert out.stdout == "True\n"
