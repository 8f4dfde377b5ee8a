"""nbdkit-retry-request-filter(1): retry a single failed request (and the plugin's open)
after a delay, without reopening (``retry-request-retries=``, ``retry-request-delay=``,
``retry-request-open=``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FastZeroRefused,
    FuaMode,
    Handle,
    LoggedError,
    PluginError,
    StartupError,
)
from luanbd.filters.emulate import fua_above, with_fua
from luanbd.filters.params import bool_parameter, parse_number

T = TypeVar("T")


class Filter(Backend):
    name = "retry-request"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = (
        "retry-request-retries=<N> Number of retries (default: 2).\n"
        "retry-request-delay=<N>   Seconds to wait before retry (default: 2).\n"
        "retry-request-open=false  Do not retry opening the plugin (default: true).")

    def __init__(self) -> None:
        self.retries = 2
        self.delay = 2
        self.retry_open = True

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "retry-request-retries":
            self.retries = parse_number(key, value)
            if self.retries > 1000:
                raise StartupError("retry-request-retries: value too large")
        elif key == "retry-request-delay":
            self.delay = parse_number(key, value)
            if self.delay == 0:
                raise StartupError("retry-request-delay cannot be 0")
        elif key == "retry-request-open":
            self.retry_open = bool_parameter(value)
        else:
            next(key, value)

    def _retry(self, call: Callable[[], T]) -> T:
        """``call()``, and up to ``retries`` more times after a delay while it fails.  The
        failures that are retried are logged here (under nbdkit the plugin logs each); the
        last one is raised for the server to log."""
        i = 0
        while True:
            try:
                return call()
            except PluginError as err:
                if i >= self.retries:
                    raise
                if not isinstance(err, (LoggedError, FastZeroRefused)):
                    log.error(str(err))
            i += 1
            log.debug(f"retry {i}: waiting {self.delay} seconds before retrying")
            current.nanosleep(self.delay, "retry-request")

    def open(self, next: Context, readonly: bool) -> Handle:
        if self.retry_open:
            self._retry(lambda: next.open(readonly))
        else:
            next.open(readonly)
        return None

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        return self._retry(lambda: next.pread(count, offset, flags))

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        # A FUA the plugin only emulates is emulated inside the retried call, as nbdkit's
        # plugin layer below this filter does (filters/emulate.py).
        return fua_above(next.can_fua())

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._retry(lambda: with_fua(next, next.can_fua(), flags,
                                     lambda f: next.pwrite(buf, offset, f)))

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._retry(lambda: with_fua(next, next.can_fua(), flags,
                                     lambda f: next.trim(count, offset, f)))

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        self._retry(lambda: next.flush(flags))

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._retry(lambda: with_fua(next, next.can_fua(), flags,
                                     lambda f: next.zero(count, offset, f)))

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        return self._retry(lambda: next.extents(count, offset, flags))

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._retry(lambda: next.cache(count, offset, flags))
