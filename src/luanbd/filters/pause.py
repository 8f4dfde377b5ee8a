"""nbdkit-pause-filter(1): pause and resume request processing through a control socket
(``pause-control=SOCKET``): ``p`` pauses (answered ``P`` once the requests in flight have
finished), ``r`` resumes (``R``), blanks are ignored, anything else is answered ``X``."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, StartupError
from luanbd.filters.rate import _absolute

#: sizeof(sun_path) on Linux.
UNIX_PATH_MAX = 108


class Filter(Backend):
    name = "pause"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = "pause-control=SOCKET           Control socket."

    def __init__(self) -> None:
        self.sockfile: str | None = None
        self.sock: socket.socket | None = None
        self._cond = threading.Condition()
        self._paused = False
        self._in_flight = 0

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "pause-control":
            self.sockfile = _absolute(value)
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        path = self.sockfile
        if path is None:
            raise StartupError("pause-control socket was not set")
        if len(os.fsencode(path)) >= UNIX_PATH_MAX:
            raise StartupError(f"pause-control socket path too long: length "
                               f"{len(os.fsencode(path))} > max {UNIX_PATH_MAX - 1} bytes")
        with contextlib.suppress(OSError):
            os.unlink(path)  # an old socket is removed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(socket.SOMAXCONN)
        except OSError as err:
            sock.close()
            raise StartupError(f"{path}: {err.strerror}") from None
        self.sock = sock
        next()

    def after_fork(self) -> None:
        threading.Thread(target=self._control, name="pause-control", daemon=True).start()

    def unload(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.sockfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.sockfile)

    # --- the control socket --------------------------------------------------------------
    def _control(self) -> None:
        """One control connection at a time: single-byte commands until end of file."""
        while True:
            sock = self.sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError as err:
                if self.sock is None:
                    return  # unloaded
                log.error(f"accept: {err.strerror}")
                continue
            with conn:
                try:
                    self._commands(conn)
                except OSError as err:
                    log.error(f"accept: {err.strerror}")

    def _commands(self, conn: socket.socket) -> None:
        while True:
            c = conn.recv(1)
            if not c:
                return
            if c == b"p":
                self._pause()
            elif c == b"r":
                self._resume()
            elif c in b"\n\t ":
                continue  # for interactive use: ignored, not answered
            else:
                c = b"x"
            conn.sendall(c.upper())

    def _pause(self) -> None:
        with self._cond:
            if self._paused:
                return
            self._paused = True
            log.debug("pause: pausing, waiting for requests to complete")
            while self._in_flight > 0:
                self._cond.wait()
        log.debug("pause: paused")

    def _resume(self) -> None:
        with self._cond:
            if not self._paused:
                return
            self._paused = False
            self._cond.notify_all()
        log.debug("pause: resumed")

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """A request waits while paused, and is counted while it runs."""
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    # --- data (as nbdkit's filter, flush is never paused) ---------------------------------
    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        with self._request():
            return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        with self._request():
            next.pwrite(buf, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        with self._request():
            next.zero(count, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        with self._request():
            next.trim(count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        with self._request():
            return next.extents(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        with self._request():
            next.cache(count, offset, flags)
