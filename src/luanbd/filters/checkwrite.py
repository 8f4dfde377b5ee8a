"""nbdkit-checkwrite-filter(1): the plugin is opened read-only and every write-like
request only checks that the data is already there (trim and zero: that it reads as
zeroes); a mismatch fails with EIO.  All write capabilities are offered whatever the
plugin has."""

from __future__ import annotations

import errno

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    EXTENT_ZERO,
    FLAG_FAST_ZERO,
    FastZeroRefused,
    FuaMode,
    Handle,
    PluginError,
    ZeroMode,
)

#: Bytes read from the plugin at a time when checking for zeroes (nbdkit's 64 MiB).
MAX_READ = 64 * 1024 * 1024


def _mismatch(callback: str) -> PluginError:
    return PluginError(callback, "data written does not match expected", errno.EIO, bare=True)


class Filter(Backend):
    name = "checkwrite"
    config_help = ""

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(True)  # whatever the client asked, the plugin is never written
        return None

    def can_write(self, next: Context, h: Handle) -> bool:
        return True

    def can_flush(self, next: Context, h: Handle) -> bool:
        return True

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        return FuaMode.NATIVE

    def can_trim(self, next: Context, h: Handle) -> bool:
        return True

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        return ZeroMode.NATIVE

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return True

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        return True

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        if bytes(next.pread(len(buf), offset, 0)) != bytes(buf):
            raise _mismatch("pwrite")

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        pass

    def _read_zeroes(self, next: Context, callback: str, count: int, offset: int) -> None:
        while count > 0:
            n = min(MAX_READ, count)
            if bytes(next.pread(n, offset, 0)).count(0) != n:
                raise _mismatch(callback)
            offset, count = offset + n, count - n

    def _check_zero(self, next: Context, callback: str, count: int, offset: int,
                    flags: int) -> None:
        if not next.can_extents():
            if flags & FLAG_FAST_ZERO:
                raise FastZeroRefused
            self._read_zeroes(next, callback, count, offset)
            return
        end = offset + count
        while offset < end:
            before = offset
            for start, length, kind in next.extents(end - offset, offset, 0):
                e_end = min(start + length, end)
                if e_end <= offset:
                    continue
                if not kind & EXTENT_ZERO:
                    if flags & FLAG_FAST_ZERO:
                        raise FastZeroRefused
                    self._read_zeroes(next, callback, e_end - offset, offset)
                offset = e_end
                if offset >= end:
                    break
            if offset == before:  # no extent covered it: read it
                self._read_zeroes(next, callback, end - offset, offset)
                return

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check_zero(next, "trim", count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check_zero(next, "zero", count, offset, flags)
