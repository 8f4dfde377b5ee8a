"""nbdkit-time-limit-filter(1) (nbdkit 1.42, newer than the 1.32 the other filters follow):
an overall time limit for each connection, counted from its open.

``time-limit=TIME`` (also ``time_limit=``, ``timelimit=``; nbdkit_parse_delay's forms such
as ``30``, ``1.5s``, ``500ms``; default 60 seconds, 0 turns the filter off).  Once the limit
has passed, the next read, write, trim, zero, extents or cache request fails with ESHUTDOWN
and the connection is closed at once (nbdkit_disconnect(1)).  As nbdkit's, an idle client is
not disconnected: the limit is checked only when a request comes.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.helpers import delay_seconds
from luanbd.backend.interface import Handle, LoggedError, StartupError

KEYS = ("time-limit", "time_limit", "timelimit")


class _Conn:
    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start = time.monotonic()


class Filter(Backend):
    name = "time-limit"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = "time-limit=TIME          Set time limit for each connection (default 60s)."

    def __init__(self) -> None:
        self.limit = 60.0

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key in KEYS:
            try:
                self.limit = delay_seconds(key, value)
            except ValueError as err:
                raise StartupError(str(err)) from None
        else:
            next(key, value)

    def open(self, next: Context, readonly: bool) -> Handle:
        h = _Conn()  # counted from before the plugin's open, as nbdkit
        next.open(readonly)
        return h

    def _check(self, h: Handle, call: str) -> None:
        if self.limit > 0 and time.monotonic() - h.start > self.limit:
            log.debug("time-limit: time limit exceeded, connection closed")
            info = current.connection()
            if info is not None:
                info.disconnect(True)
            # Not logged as an error (nbdkit does not either): the client is cut off.
            raise LoggedError(call, "time limit exceeded", errno.ESHUTDOWN, bare=True)

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        self._check(h, "pread")
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._check(h, "pwrite")
        next.pwrite(buf, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check(h, "trim")
        next.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check(h, "zero")
        next.zero(count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        self._check(h, "extents")
        return next.extents(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check(h, "cache")
        next.cache(count, offset, flags)
