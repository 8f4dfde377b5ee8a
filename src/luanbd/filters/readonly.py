"""nbdkit-readonly-filter(1) (nbdkit 1.38): without ``readonly-file`` the plugin is served
read-only (as ``-r``); with ``readonly-file=PATH`` writes, trims and zeroes are refused with
EPERM while PATH exists, and go through while it does not (checked at each request)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError, StartupError


class Filter(Backend):
    name = "readonly"
    config_help = "readonly-file=FILENAME         If FILENAME present, set to readonly"

    def __init__(self) -> None:
        self.ro_file: str | None = None

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "readonly-file":
            if self.ro_file is not None:
                raise StartupError("readonly-file parameter appears multiple times")
            self.ro_file = value
        else:
            next(key, value)

    def open(self, next: Context, readonly: bool) -> Handle:
        # Always read-only: the plugin is told so (it may behave differently, as with -r).
        # With the file, the connection must stay writable for when the file goes away.
        next.open(readonly or self.ro_file is None)
        return None

    def can_write(self, next: Context, h: Handle) -> bool:
        if self.ro_file is None:
            return False
        return next.can_write()

    def _refuse(self, fn: str) -> None:
        if self.ro_file is None or os.access(self.ro_file, os.R_OK):
            # EROFS: the server sends NBD_EPERM; the log says "Read-only file system".
            raise PluginError(fn, f"{fn} operation rejected by readonly filter", errno.EROFS,
                              bare=True)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._refuse("pwrite")
        next.pwrite(buf, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._refuse("trim")
        next.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._refuse("zero")
        next.zero(count, offset, flags)
