"""--log=syslog, and syslog by default once luanbd runs in the background (as nbdkit): the
lines reach a real syslog socket, /dev/log, which the test binds itself (this needs root and
no syslog daemon of the machine's own on /dev/log; otherwise the tests are skipped)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from luanbd_procs import (
    Server,
    StartServer,
    line_of,
    run_luanbd,
    script,
    terminate_pid,
    wait_file,
    where,
)

DISK = script("disk.lua")
DEV_LOG = "/dev/log"
LOG_DAEMON = 3 << 3
LOG_ERR, LOG_DEBUG = 3, 7


@pytest.fixture
def syslog() -> Iterator[socket.socket]:
    """A datagram socket on /dev/log standing in for the syslog daemon."""
    if os.path.exists(DEV_LOG):
        pytest.skip("/dev/log belongs to this machine's syslog daemon")
    if os.geteuid() != 0:
        pytest.skip("binding /dev/log needs root")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(DEV_LOG)
    except OSError as err:
        pytest.skip(f"cannot bind /dev/log: {err}")
    sock.settimeout(10)
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DEV_LOG)


def messages_until(sock: socket.socket, text: str) -> list[str]:
    got = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got.append(sock.recv(65536).decode("utf-8", "replace"))
        if text in got[-1]:
            return got
    raise AssertionError(f"{text!r} not logged; got {got}")


def test_log_syslog_in_the_foreground(start_server: StartServer,
                                      syslog: socket.socket) -> None:
    server: Server = start_server(DISK, "failonce=pread", options=["--log=syslog"])
    h = nbd.NBD()
    h.connect_uri(server.uri)
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    got = messages_until(syslog, 'pread failed')
    line = got[-1]
    # <priority>timestamp luanbd[pid]: error: pread: disk.lua:N: pread failed
    assert line.startswith(f"<{LOG_DAEMON | LOG_ERR}>"), line
    at = where(DISK, line_of(DISK, 'error("pread failed")'))
    assert f"luanbd[{server.proc.pid}]: error: pread: {at}: pread failed" in line
    assert server.errors() == []  # nothing on stderr


def test_daemon_logs_to_syslog_by_default(workdir: Path, syslog: socket.socket) -> None:
    pidfile, sock = workdir / "d.pid", workdir / "d.sock"
    result = run_luanbd("-v", "-P", str(pidfile), "-U", str(sock), DISK, "failonce=pread")
    assert result.returncode == 0, result
    assert result.stderr == ""  # once in the background, nothing goes to the terminal
    pid = int(wait_file(pidfile))
    try:
        h = nbd.NBD()
        h.connect_unix(str(sock))
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
        got = messages_until(syslog, "pread failed")
        assert any(m.startswith(f"<{LOG_DAEMON | LOG_DEBUG}>") and
                   f"luanbd[{pid}]: debug: conn 1: accepted connection" in m for m in got), got
        assert got[-1].startswith(f"<{LOG_DAEMON | LOG_ERR}>")
    finally:
        assert terminate_pid(pid, 15)
