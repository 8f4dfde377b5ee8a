"""Listening sockets (TCP, Unix) and the accept loop.

One thread waits on every listener plus a wake-up pipe, so closing never polls.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from luanbd import log

#: listen() backlog: SOMAXCONN, as nbdkit (a burst of connects waits in the queue instead of
#: failing with EAGAIN; the kernel caps it at net.core.somaxconn).
BACKLOG = socket.SOMAXCONN
#: Seconds to pause accepting when the process is out of file descriptors.
ACCEPT_BACKOFF = 0.1


class BindError(Exception):
    """Could not listen where asked: a start-up error."""


def bind_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise BindError(f"bind: {path}: {err.strerror}") from None
    return sock


def bind_vsock(port: int) -> socket.socket:
    """--vsock: listen on AF_VSOCK (virtual machine sockets), any CID, as nbdkit."""
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except (AttributeError, OSError) as err:
        reason = getattr(err, "strerror", None) or "AF_VSOCK is not supported here"
        raise BindError(f"--vsock: socket: {reason}") from None
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise BindError(f"bind: vsock port {port}: {err.strerror}") from None
    return sock


def bind_tcp(host: str | None, port: int, family: int = 0) -> list[socket.socket]:
    """Listen on every address ``host`` resolves to (all addresses when None), as nbdkit."""
    af = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(host, port, af, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise BindError(f"getaddrinfo: {host or '*'}: {port}: {err.strerror}") from None
    sockets: list[socket.socket] = []
    errors: list[str] = []
    for fam, kind, proto, _, addr in infos:
        sock = socket.socket(fam, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
        except OSError as err:
            sock.close()
            errors.append(f"bind: {addr[0]} port {port}: {err.strerror}")
            continue
        sockets.append(sock)
    if not sockets:
        raise BindError(errors[0] if errors else f"no address to listen on for {host}")
    return sockets


#: systemd's first passed fd (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def activated_sockets(count: int) -> list[socket.socket]:
    """The listening sockets systemd (or libnbd) passed as fds 3 .. 3+count-1."""
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise BindError(f"socket activation: fd {fd}: {err.strerror}") from None
        sock.setblocking(True)
        sockets.append(sock)
    return sockets


class Listener:
    """Accept on a set of listening sockets until :meth:`close`."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._exhausted_log = log.Throttle(10.0)

    def start(self, handle: Callable[[socket.socket, str], None]) -> None:
        self._thread = threading.Thread(target=self._accept_loop, args=(handle,),
                                        name="accept", daemon=True)
        self._thread.start()

    def _accept_loop(self, handle: Callable[[socket.socket, str], None]) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            for sock in self.sockets:
                sel.register(sock, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    listener = key.fileobj
                    assert isinstance(listener, socket.socket)
                    try:
                        conn, addr = listener.accept()
                    except OSError as err:
                        if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                         errno.ENOMEM):
                            # Out of descriptors: the pending connection stays in the
                            # backlog; pause instead of spinning on a readable listener.
                            self._report_exhausted(err)
                            time.sleep(ACCEPT_BACKOFF)
                        else:
                            log.debug(f"accept: {err}")
                        continue
                    if listener.family == getattr(socket, "AF_VSOCK", None):
                        peer = f"vsock:{addr[0]}:{addr[1]}"  # (CID, port)
                    elif isinstance(addr, tuple):
                        peer = f"{addr[0]}:{addr[1]}"
                    else:
                        peer = str(addr)
                    handle(conn, peer)

    def _report_exhausted(self, err: OSError) -> None:
        if self._exhausted_log.ready():
            log.error(f"accept: {err.strerror}: new connections wait until others close")

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        for sock in self.sockets:
            sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
