"""Sending and receiving for one connection: replies batched into one sendmsg, partial
sends, the writer thread for big batches, and the ``bytes`` a big WRITE payload is received
into (an I/O trick kept out of the sans-IO ``luanbd.protocol``)."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Callable

from luanbd.protocol.replies import Buffers

#: sendmsg() takes at most IOV_MAX (1024 on Linux) buffers at once.
MAX_IOV = 1024
#: READ batches of at least this many bytes go to the connection's writer thread.
WRITER_THRESHOLD = 128 * 1024
#: Reply batches queued for the writer thread at most (then the request loop waits).
WRITER_QUEUE = 2
#: READ replies of this many bytes are sent before more requests are executed.
MAX_BATCH = 4 * 1024 * 1024


def _bytes_writer() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """CPython: make a ``bytes`` object of n bytes and a writable view of its contents.

    The object is filled before anybody else sees it (its hash is computed lazily), which
    saves copying a large WRITE payload out of the receive buffer: the kernel writes it
    where the plugin will read it.  None where this is not CPython.
    """
    try:
        import ctypes

        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        offset = bytes.__basicsize__ - 1  # offsetof(PyBytesObject, ob_sval)
    except (ImportError, AttributeError):
        return None

    def make(n: int) -> tuple[bytes, memoryview]:
        obj: bytes = new(None, n)
        array = (ctypes.c_char * n).from_address(id(obj) + offset)
        return obj, memoryview(array).cast("B")

    probe, view = make(3)  # make sure the layout is what we think, once
    view[:] = b"abc"
    return make if probe == b"abc" else None


#: The RequestParser's payload_buffer (None: payloads go through the receive buffer).
writable_bytes = _bytes_writer()


def send_buffers(sock: socket.socket, tls: bool, buffers: Buffers) -> None:
    """Send a batch of replies with as few syscalls as possible (sendmsg gathers)."""
    if tls:
        # SSLSocket has no sendmsg: one record stream, so join and sendall.
        if buffers:
            sock.sendall(b"".join(buffers))
        return
    while buffers:
        batch = buffers[:MAX_IOV] if len(buffers) > MAX_IOV else buffers
        sent = sock.sendmsg(batch)
        total = sum(map(len, batch))
        if sent < total:
            # Partial send: drop what went out, send the rest of this batch plainly.
            rest = []
            for b in batch:
                if sent >= len(b):
                    sent -= len(b)
                    continue
                rest.append(memoryview(b)[sent:])
                sent = 0
            for b in rest:
                sock.sendall(b)
        buffers = buffers[MAX_IOV:]


class ClientGone(Exception):
    """The client closed the connection (or it was shut down under us)."""


class Writer:
    """A connection's writer thread for big reply batches, started on first use.

    The queue is bounded: when the client reads slowly, ``put`` blocks the request loop
    (backpressure) instead of letting replies pile up in memory.  ``lock`` makes each batch
    go out whole, whoever sends it.
    """

    def __init__(self, send: Callable[[Buffers], None], sock: socket.socket,
                 shutdown_read: Callable[[], None], name: str) -> None:
        self._send = send
        self._sock = sock
        self._shutdown_read = shutdown_read
        self._name = name
        self.lock = threading.Lock()
        self._queue: queue.Queue[Buffers | None] = queue.Queue(WRITER_QUEUE)
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    @property
    def started(self) -> bool:
        """The thread runs: sending elsewhere must take ``lock``."""
        return self._thread is not None

    def put(self, buffers: Buffers) -> None:
        if self._error is not None:
            raise ClientGone from self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=self._name)
            self._thread.start()
        self._queue.put(buffers)

    def _run(self) -> None:
        send = self._send
        while (buffers := self._queue.get()) is not None:
            if self._error is not None:
                continue  # the client is gone: drop, but keep draining so put never blocks
            try:
                with self.lock:
                    send(buffers)
            except OSError as err:
                self._error = err
                self._shutdown_read()  # the request loop sees EOF and ends

    def finish(self) -> None:
        """Wait until every queued batch is sent (before DISC or a disconnect closes)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise ClientGone from self._error

    def stop(self) -> None:
        """The request loop ended: let the thread go without waiting for the client."""
        if self._thread is not None:
            if self._error is None:
                # Unblock a sendmsg to a client that stopped reading.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)  # never an SSLSocket here
            self._queue.put(None)
            self._thread.join()
            self._thread = None


