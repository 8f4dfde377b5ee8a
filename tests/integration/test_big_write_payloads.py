"""Big WRITE payloads received whole (MSG_WAITALL) straight into the bytes Lua gets.

The request loop waits for the rest of a WRITE payload of 64 KiB or more in one receive
instead of one trip per piece the socket hands over.  What must hold: a payload that arrives
in many pieces, slowly, with the next request right behind it, lands intact; while one
connection waits for its payload the others are served; a client that sends part of a payload
and stops holds neither the server's shutdown nor other clients.  (TLS sockets take no
flags and keep the piecewise receive: test_tls.py writes 3 MiB + 17 bytes through one.)
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

from luanbd_procs import CMD_READ, CMD_WRITE, RawClient, StartServer, run_client, script

DISK = script("disk.lua")
MiB = 1024 * 1024


def send_slowly(sock: socket.socket, data: bytes, pieces: int, pause: float) -> None:
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        sock.sendall(data[i:i + step])
        time.sleep(pause)


def test_a_payload_in_pieces_with_the_next_request_behind_it(start_server: StartServer) -> None:
    server = start_server(DISK, "size=4M")
    assert server.sock is not None
    payload = os.urandom(MiB + 4096 + 7)  # not a multiple of the page size
    with RawClient(server.sock) as c:
        c.connect_export()
        c.send_request(CMD_WRITE, 8192, len(payload), cookie=1)
        # The last piece carries the next request's header in the same send.
        send_slowly(c.sock, payload[:-100], pieces=37, pause=0.005)
        c.sock.sendall(payload[-100:] + c_request(CMD_READ, 8192, len(payload), cookie=2))
        error, cookie, _ = c.reply()
        assert (error, cookie) == (0, 1)
        error, cookie, data = c.reply(len(payload))
        assert (error, cookie) == (0, 2)
        assert data == payload
        # Pipelined: two big writes and a read in one send.
        a, b = os.urandom(256 * 1024), os.urandom(300 * 1024)
        c.sock.sendall(c_request(CMD_WRITE, 0, len(a), cookie=3) + a
                       + c_request(CMD_WRITE, len(a), len(b), cookie=4) + b
                       + c_request(CMD_READ, 0, len(a) + len(b), cookie=5))
        assert c.reply()[:2] == (0, 3)
        assert c.reply()[:2] == (0, 4)
        error, cookie, data = c.reply(len(a) + len(b))
        assert (error, cookie, data) == (0, 5, a + b)


def c_request(cmd: int, offset: int, length: int, *, cookie: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie, offset, length)


def test_others_are_served_while_a_payload_is_awaited(start_server: StartServer) -> None:
    server = start_server(DISK, "size=4M")
    assert server.sock is not None
    payload = os.urandom(2 * MiB)
    with RawClient(server.sock) as c:
        c.connect_export()
        c.send_request(CMD_WRITE, 0, len(payload), cookie=9, data=payload[:MiB // 2])
        # The connection's thread now waits for 1.5 MiB more: other clients go on.
        for _ in range(3):
            out = run_client(["nbdsh", "-u", server.uri, "-c",
                              "h.pwrite(b'x' * 4096, 3 * 1048576); "
                              "print(h.pread(4096, 3 * 1048576) == b'x' * 4096)"])
            assert out.stdout == "True\n"
        c.sock.sendall(payload[MiB // 2:])
        assert c.reply()[:2] == (0, 9)
        error, data = c.read(0, len(payload), cookie=10)
        assert (error, data) == (0, payload)


def test_a_half_sent_payload_does_not_hold_the_shutdown(start_server: StartServer) -> None:
    server = start_server(DISK, "size=4M")
    assert server.sock is not None
    with RawClient(server.sock) as c:
        c.connect_export()
        c.send_request(CMD_WRITE, 0, MiB, cookie=1, data=b"h" * (MiB // 3))
        time.sleep(0.2)  # the server is in its receive of the rest
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        assert c.closed_by_server(timeout=5)


def test_a_client_that_stops_mid_payload_then_leaves(start_server: StartServer) -> None:
    server = start_server(DISK, "size=4M")
    assert server.sock is not None
    c = RawClient(server.sock)
    c.connect_export()
    c.send_request(CMD_WRITE, 0, MiB, cookie=1, data=b"q" * (MiB - 1))
    done = threading.Event()

    def leave() -> None:
        time.sleep(0.3)
        c.close()
        done.set()

    threading.Thread(target=leave).start()
    assert done.wait(5)
    # Nothing of the incomplete write reached the disk, and the server goes on.
    out = run_client(["nbdsh", "-u", server.uri, "-c",
                      "print(h.pread(4096, 0) == bytes(4096))"])
    assert out.stdout == "True\n"
    assert server.alive()
