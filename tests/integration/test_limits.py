"""Limits an operator sets (issue 5): the handshake timeout (``--timeout``), the connection
limit (``--limit``, nbdkit's ``--filter=limit limit=N``), the time limit of a Lua callback
(``--request-timeout``), the Lua memory limit (``--lua-memory-limit``), and ``os.exit`` in a
callback.  Each is hit by a real client; the server logs one line and goes on serving.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import nbd
import pytest
from luanbd_procs import (
    IHAVEOPT,
    NBDMAGIC,
    Server,
    StartServer,
    line_of,
    run_luanbd,
    script,
    where,
)

BUGGY = script("buggy_callbacks.lua")


def connect(server: Server) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri)
    return h


def raw_connect(server: Server) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(server.sock))
    return s


def wait_probe_closed(server: Server) -> None:
    """wait_listening's probe connection must be gone before connections are counted."""
    server.wait_log("conn 1: closed")


# --- --timeout ---------------------------------------------------------------------------------

def test_silent_client_is_dropped_after_timeout(start_server: StartServer) -> None:
    server = start_server(BUGGY, options=["--timeout=1.5"])
    s = raw_connect(server)
    assert s.recv(8) == NBDMAGIC
    start = time.monotonic()
    rest = b""
    while chunk := s.recv(4096):  # the greeting's tail, then EOF when the server gives up
        rest += chunk
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 8.0, elapsed
    log = server.wait_log("did not finish the handshake")
    lines = [line for line in server.errors() if "handshake" in line]
    assert lines == ["luanbd: error: conn 2: client did not finish the handshake within "
                     "1.5 seconds (--timeout)"], log
    # The next client is served as usual.
    h = connect(server)
    assert h.pread(512, 16384) == bytes(512)


def test_trickling_client_is_dropped_after_timeout(start_server: StartServer) -> None:
    """--timeout bounds the whole handshake, not each read: a client that keeps sending one
    byte at a time (slow-loris) is cut off too."""
    server = start_server(BUGGY, options=["--timeout=2"])
    s = raw_connect(server)
    assert s.recv(18)[:8] == NBDMAGIC
    # Client flags, an NBD_OPT_GO header announcing 1000 bytes, then its payload: one byte
    # every 0.25 s (14 s in all if it were allowed).
    trickle = struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 1000) + bytes(36)
    start = time.monotonic()
    closed = False
    for byte in trickle:
        try:
            s.send(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.25)
        if time.monotonic() - start > 4:
            break
    if not closed:
        s.settimeout(3)
        try:
            closed = s.recv(4096) == b""
        except OSError:
            closed = True
    assert closed, "the trickling client was not disconnected"
    assert time.monotonic() - start < 5.5
    server.wait_log("did not finish the handshake within 2 seconds (--timeout)")


def test_timeout_accepts_nbdkit_delay_formats(start_server: StartServer) -> None:
    server = start_server(BUGGY, options=["--timeout=700ms"])
    s = raw_connect(server)
    assert s.recv(8) == NBDMAGIC
    start = time.monotonic()
    while s.recv(4096):
        pass
    assert time.monotonic() - start < 5.0
    server.wait_log("within 0.7 seconds")


def test_timeout_does_not_cut_idle_transmission(start_server: StartServer) -> None:
    """The handshake timeout ends at NBD_OPT_GO: a connected client may stay idle."""
    server = start_server(BUGGY, options=["--timeout=1"])
    h = connect(server)
    time.sleep(2.0)
    assert h.pread(512, 16384) == bytes(512)
    assert not [line for line in server.errors() if "handshake" in line]


@pytest.mark.parametrize("value", ["abc", "-1", "5 minutes"])
def test_bad_timeout_is_a_usage_error(value: str) -> None:
    result = run_luanbd(f"--timeout={value}", BUGGY, "--dump-plugin")
    assert result.returncode == 1
    assert result.stderr.startswith("luanbd: --timeout: could not parse delay"), result.stderr


# --- --limit -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [["--limit=2"], ["--filter=limit"]],
                         ids=["--limit", "--filter=limit"])
def test_connection_limit(start_server: StartServer, options: list[str]) -> None:
    args = ["limit=2"] if "--filter=limit" in options else []
    server = start_server(BUGGY, *args, options=["-v", *options])
    wait_probe_closed(server)
    first, second = connect(server), connect(server)
    for _ in range(3):  # refused at once: EOF before any greeting
        s = raw_connect(server)
        assert s.recv(8) == b""
        s.close()
    lines = [line for line in server.errors() if "limit" in line]
    # One line for the burst, not one per refused connection.
    assert lines == ["luanbd: error: connection limit of 2 reached (--limit): closed the "
                     "connection from local (1 refused so far)"], server.log()
    assert first.pread(512, 16384) == bytes(512)
    second.shutdown()
    server.wait_log("conn 3: closed")
    third = connect(server)  # a slot is free again
    assert third.pread(512, 16384) == bytes(512)


def test_filter_limit_defaults_to_one(start_server: StartServer) -> None:
    """nbdkit-limit-filter(1): limit=1 unless told otherwise; the limit= key is the
    filter's, so the script never sees it (buggy_callbacks.lua rejects unknown keys)."""
    server = start_server(BUGGY, options=["-v", "--filter=limit"])
    wait_probe_closed(server)
    h = connect(server)
    s = raw_connect(server)
    assert s.recv(8) == b""
    assert h.pread(512, 16384) == bytes(512)


def test_a_filter_luanbd_lacks_is_refused() -> None:
    result = run_luanbd("--filter=nosuch", BUGGY, "--dump-plugin")
    assert result.returncode == 1
    assert result.stderr.startswith("luanbd: error: --filter=nosuch: luanbd has no such "
                                    "filter (its filters: ")
    assert " limit, " in result.stderr
    assert result.stderr.count("\n") == 1


def test_bad_limit_is_a_usage_error() -> None:
    result = run_luanbd("--limit=many", BUGGY, "--dump-plugin")
    assert result.returncode == 1
    assert "--limit: many: not a number of connections" in result.stderr


# --- buggy callbacks: a loop that never ends, os.exit, memory, yield ---------------------------

def test_request_timeout_interrupts_a_lua_loop(start_server: StartServer) -> None:
    server = start_server(BUGGY, options=["--request-timeout=0.5"])
    h = connect(server)
    start = time.monotonic()
    with pytest.raises(nbd.Error) as err:
        h.pread(512, 4096)  # `while true do end`
    assert 0.4 < time.monotonic() - start < 5.0
    assert err.value.errno == "EIO"
    at = where(BUGGY, line_of(BUGGY, 'while true do end'))
    line = f"luanbd: error: pread: {at}: callback still " \
           "running after 0.5 seconds (--request-timeout)"
    assert server.errors() == [line]
    # The same connection goes on, and so does the Lua state.
    assert h.pread(512, 16384) == bytes(512)
    h.pwrite(b"x" * 512, 0)
    assert h.pread(512, 0) == b"x" * 512


def test_without_request_timeout_other_connections_are_served(
        start_server: StartServer) -> None:
    """A stuck callback holds its own connection only (parallel thread model, one Lua
    state per connection): the others go on."""
    server = start_server(BUGGY, "spin=0.8", options=[])
    h1 = connect(server)
    h1.aio_pread(nbd.Buffer(512), 20480)  # spins in Lua for 0.8 s
    h2 = connect(server)
    start = time.monotonic()
    assert h2.pread(512, 16384) == bytes(512)
    assert time.monotonic() - start < 0.7
    while h1.aio_in_flight():
        h1.poll(1)


def test_os_exit_in_a_callback_fails_that_request(start_server: StartServer) -> None:
    server = start_server(BUGGY)
    h = connect(server)
    with pytest.raises(nbd.Error) as err:
        h.pread(512, 0)  # os.exit(3)
    assert err.value.errno == "EIO"
    at = where(BUGGY, line_of(BUGGY, 'os.exit(3)'))
    assert server.errors() == [
        f"luanbd: error: pread: {at}: os.exit is not allowed "
        "while serving clients (use nbdkit.shutdown() to stop the server)"]
    assert server.alive()
    assert h.pread(512, 16384) == bytes(512)


def test_os_exit_while_loading_exits_like_nbdkit(workdir: Path) -> None:
    """At the top level of the script, os.exit ends the process with its status, as under
    nbdkit (the server is not serving anybody yet)."""
    path = workdir / "exit.lua"
    path.write_text("io.stderr:write('bye\\n')\nos.exit(7)\n")
    result = run_luanbd("-f", "-U", str(workdir / "s.sock"), str(path))
    assert result.returncode == 7
    assert result.stderr == "bye\n"


def test_lua_memory_limit_gives_enomem(start_server: StartServer) -> None:
    server = start_server(BUGGY, options=["--lua-memory-limit=64M"])
    h = connect(server)
    with pytest.raises(nbd.Error) as err:
        h.pread(512, 8192)  # a table of strings that grows without end
    assert err.value.errno == "ENOMEM"
    assert server.errors() == ["luanbd: error: pread: not enough memory"]
    assert h.pread(512, 16384) == bytes(512)


def test_yield_outside_a_coroutine_is_an_error(start_server: StartServer) -> None:
    server = start_server(BUGGY)
    h = connect(server)
    with pytest.raises(nbd.Error) as err:
        h.pread(512, 12288)
    assert err.value.errno == "EIO"
    assert server.errors() == ["luanbd: error: pread: attempt to yield from outside a "
                               "coroutine"]
    assert h.pread(512, 16384) == bytes(512)


def test_bad_memory_limit_is_a_usage_error() -> None:
    result = run_luanbd("--lua-memory-limit=lots", BUGGY, "--dump-plugin")
    assert result.returncode == 1
    assert result.stderr == ("luanbd: --lua-memory-limit: could not parse size string "
                             "(lots)\n")



# --- --lua-gc ---------------------------------------------------------------------------------

GCMODE = script("gcmode.lua")


@pytest.mark.parametrize("mode", ["incremental", "generational", None])
def test_lua_gc_mode(start_server: StartServer, mode: str | None) -> None:
    options = [f"--lua-gc={mode}"] if mode else []
    server = start_server(GCMODE, options=options)
    h = connect(server)
    assert h.pread(512, 0).rstrip() == (mode or "incremental").encode()


def test_lua_gc_needs_lua54() -> None:
    result = run_luanbd("--lua=5.1", "--lua-gc=generational", GCMODE, "--dump-plugin")
    assert result.returncode == 1
    assert result.stderr == ("luanbd: error: --lua-gc=generational: needs Lua 5.4 or later "
                             "(--lua=5.4)\n")


def test_lua_gc_unknown_mode() -> None:
    result = run_luanbd("--lua-gc=fast", GCMODE, "--dump-plugin")
    assert result.returncode == 1
    assert result.stderr == "luanbd: error: --lua-gc=fast: choose from incremental, generational\n"


def test_failed_request_names_its_connection_with_v(start_server: StartServer) -> None:
    """Error lines keep nbdkit's shape; with -v a debug line adds the connection, the
    request and the errno (issue 6: the connection number in the log)."""
    server = start_server(BUGGY, options=["-v"])
    h = connect(server)
    with pytest.raises(nbd.Error):
        h.pread(512, 12288)  # coroutine.yield outside a coroutine
    log = server.wait_log("failed: EIO")
    assert "luanbd: error: pread: attempt to yield from outside a coroutine" in log
    debug = [line for line in log.splitlines() if "failed: EIO" in line]
    assert len(debug) == 1
    assert debug[0].startswith("luanbd: debug: conn 2: NBD_CMD_READ cookie=")
    assert debug[0].endswith("offset=12288 count=512 failed: EIO")
