"""nbdkit-retry-filter(1): when a request fails, close the plugin, wait, open it again and
retry the request (``retries=``, ``retry-delay=``, ``retry-exponential=``,
``retry-readonly=``)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TypeVar

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    CacheMode,
    FastZeroRefused,
    FuaMode,
    Handle,
    LoggedError,
    PluginError,
    StartupError,
    ThreadModel,
    ZeroMode,
)
from luanbd.filters.emulate import fua_above, with_fua
from luanbd.filters.params import bool_parameter, parse_number

T = TypeVar("T")



class _Conn:
    """One connection: how it was opened, and whether the layers below are open now."""

    __slots__ = ("is_open", "readonly", "reopens", "size")

    def __init__(self, readonly: bool) -> None:
        self.readonly = readonly
        self.reopens = 0
        self.is_open = True
        #: The size of the layers below since the last (re)open (nbdkit caches it there).
        self.size: int | None = None


def _fail(call: str, message: str, code: int) -> LoggedError:
    """An error of the filter's own checks: nbdkit sets errno and logs nothing."""
    return LoggedError(call, message, code, bare=True)


def _need_open(h: _Conn) -> None:
    if not h.is_open:  # the last reopen failed: try again
        raise _fail("retry", "the plugin is not open", errno.ESHUTDOWN)


class _Final(Exception):
    """A check that fails the request at once, without a retry."""

    def __init__(self, error: PluginError) -> None:
        super().__init__(str(error))
        self.error = error


class Filter(Backend):
    name = "retry"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = (
        "retries=<N>              Number of retries (default: 5).\n"
        "retry-delay=<N>          Seconds to wait before retry (default: 2).\n"
        "retry-exponential=yes|no Exponential back-off (default: yes).\n"
        "retry-readonly=yes|no    Force read-only on failure (default: no).")

    def __init__(self) -> None:
        self.retries = 5
        self.delay = 2
        self.exponential = True
        self.force_readonly = False

    @property
    def thread_model(self) -> ThreadModel:
        # Reopening under a request of the same connection is not safe (as nbdkit).
        return ThreadModel.SERIALIZE_REQUESTS

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "retries":
            self.retries = parse_number("retries", value)
        elif key == "retry-delay":
            self.delay = parse_number("retry-delay", value)
            if self.delay == 0:
                raise StartupError("retry-delay cannot be 0")
        elif key == "retry-exponential":
            self.exponential = bool_parameter(value)
        elif key == "retry-readonly":
            self.force_readonly = bool_parameter(value)
        else:
            next(key, value)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        return _Conn(readonly)

    def close(self, next: Context, h: Handle) -> None:
        log.debug(f"reopens needed: {h.reopens}")
        if h.is_open:
            next.close()

    def get_size(self, next: Context, h: Handle) -> int:
        # Kept for the range checks: nbdkit asks the plugin once per (re)open.
        size = next.get_size()
        h.size = size
        return size

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        # The FUA of a retried write is emulated inside the retried call, as in nbdkit's
        # plugin layer below this filter (filters/emulate.py).
        return fua_above(next.can_fua())

    # --- the retry loop ------------------------------------------------------------------
    def _retry(self, next: Context, h: _Conn, method: str, attempt: Callable[[], T]) -> T:
        """``attempt()``; while it fails and retries are left: wait, reopen the layers
        below and attempt again (nbdkit's do_retry).  Each failure that is retried is
        logged here (under nbdkit the plugin logs each as it happens); the last one is
        raised for the server to log."""
        retry = 0
        delay = self.delay
        while True:
            try:
                return attempt()
            except _Final as final:
                raise final.error from None
            except PluginError as err:
                last = err
            while True:
                if retry >= self.retries:
                    log.debug(f"could not recover after {self.retries} retries")
                    raise last
                if not isinstance(last, (LoggedError, FastZeroRefused)):
                    log.error(str(last))
                log.debug(f"{method} failed: original errno = {last.errno}")
                log.debug(f"retry {retry + 1}: waiting {delay} seconds before retrying")
                current.nanosleep(delay, method)  # a stopping server: no more retries
                retry += 1
                if self.exponential:
                    delay *= 2
                h.reopens += 1
                if h.is_open:
                    h.is_open = False
                    try:
                        next.close()
                    except PluginError as err:
                        log.error(str(err))
                h.size = None
                try:
                    next.open(h.readonly or self.force_readonly)
                except PluginError as err:
                    # A failed reopen is a failed retry, with ESHUTDOWN.
                    last = PluginError(err.callback, str(err), errno.ESHUTDOWN, bare=True)
                    continue
                h.is_open = True
                break

    def _check_range(self, next: Context, h: _Conn, count: int, offset: int,
                     is_write: bool) -> None:
        _need_open(h)
        if h.size is None:
            h.size = next.get_size()
        if offset + count > h.size:
            raise _fail("retry", "request out of range",
                        errno.ENOSPC if is_write else errno.EIO)

    def _check_write(self, next: Context, h: _Conn, call: str, flags: int,
                     can: Callable[[], bool]) -> FuaMode:
        if not can():
            raise _fail(call, f"{call}: not writable", errno.EROFS)
        fua = next.can_fua()
        if flags & FLAG_FUA and fua <= FuaMode.NONE:
            raise _fail(call, f"{call}: no FUA", errno.EIO)
        return fua

    def _readonly_now(self, h: _Conn, call: str) -> None:
        if h.reopens and self.force_readonly:
            raise _Final(_fail(call, f"{call}: read-only after a retry", errno.EROFS))

    # --- data ----------------------------------------------------------------------------
    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        def attempt() -> bytes | memoryview:
            self._check_range(next, h, count, offset, False)
            return next.pread(count, offset, flags)
        return self._retry(next, h, "pread", attempt)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        def attempt() -> None:
            self._readonly_now(h, "pwrite")
            self._check_range(next, h, len(buf), offset, True)
            fua = self._check_write(next, h, "pwrite", flags, next.can_write)
            with_fua(next, fua, flags, lambda f: next.pwrite(buf, offset, f))
        self._retry(next, h, "pwrite", attempt)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        def attempt() -> None:
            self._readonly_now(h, "trim")
            self._check_range(next, h, count, offset, True)
            fua = self._check_write(next, h, "trim", flags, next.can_trim)
            with_fua(next, fua, flags, lambda f: next.trim(count, offset, f))
        self._retry(next, h, "trim", attempt)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        def attempt() -> None:
            _need_open(h)
            if not next.can_flush():
                raise _fail("flush", "flush: not supported", errno.EIO)
            next.flush(flags)
        self._retry(next, h, "flush", attempt)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        def attempt() -> None:
            self._readonly_now(h, "zero")
            # A fast zero that cannot be done is refused at once, not retried.
            if flags & FLAG_FAST_ZERO and (not h.is_open or not next.can_fast_zero()):
                raise _Final(FastZeroRefused())
            self._check_range(next, h, count, offset, True)
            fua = self._check_write(next, h, "zero", flags,
                                    lambda: next.can_zero() > ZeroMode.NONE)
            with_fua(next, fua, flags, lambda f: next.zero(count, offset, f))
        self._retry(next, h, "zero", attempt)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        def attempt() -> list[tuple[int, int, int]]:
            self._check_range(next, h, count, offset, False)
            if not next.can_extents():
                raise _fail("extents", "extents: not supported", errno.EIO)
            return next.extents(count, offset, flags)
        return self._retry(next, h, "extents", attempt)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        def attempt() -> None:
            self._check_range(next, h, count, offset, False)
            if next.can_cache() <= CacheMode.NONE:
                raise _fail("cache", "cache: not supported", errno.EIO)
            next.cache(count, offset, flags)
        self._retry(next, h, "cache", attempt)
