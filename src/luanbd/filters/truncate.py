"""nbdkit-truncate-filter(1): change the plugin's size (``truncate=SIZE``, ``round-up=N``,
``round-down=N``); past the plugin's end the disk reads as zeroes and takes only zeroes."""

from __future__ import annotations

import errno
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    FLAG_FAST_ZERO,
    FastZeroRefused,
    Handle,
    PluginError,
    StartupError,
)
from luanbd.filters.params import size_parameter

_UINT_MAX = (1 << 32) - 1
_INT64_MAX = (1 << 63) - 1


def _round_parameter(key: str, value: str) -> int:
    n = size_parameter(key, value)
    if n == 0:
        raise StartupError(f"if set, the {key} parameter must be > 0")
    if n > _UINT_MAX:
        raise StartupError(f"the {key} parameter is too large")
    if n & (n - 1):
        raise StartupError(f"the {key} parameter must be a power of 2")
    return n


class _Sizes:
    """A connection's sizes, fixed at open: the plugin's, and the one served."""

    __slots__ = ("real", "size")

    def __init__(self, real: int, size: int) -> None:
        self.real = real
        self.size = size


class Filter(Backend):
    name = "truncate"
    config_help = ("truncate=<SIZE>                The new size.\n"
                   "round-up=<N>                   Round up to next multiple of N.\n"
                   "round-down=<N>                 Round down to multiple of N.")

    def __init__(self) -> None:
        self.truncate: int | None = None
        self.round_up = 0
        self.round_down = 0

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "truncate":
            self.truncate = size_parameter(key, value)
        elif key == "round-up":
            self.round_up = _round_parameter(key, value)
        elif key == "round-down":
            self.round_down = _round_parameter(key, value)
        else:
            next(key, value)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        # The sizes stay what they were at open for the whole connection (NBD has no resize).
        real = size = next.get_size()
        if self.truncate is not None:
            size = self.truncate
        if self.round_up:
            rounded = -(-size // self.round_up) * self.round_up
            if rounded > _INT64_MAX:
                raise PluginError("open", f"cannot round size {size} up to next boundary of "
                                          f"{self.round_up}", bare=True)
            size = rounded
        if self.round_down:
            size -= size % self.round_down
        return _Sizes(real, size)

    def get_size(self, next: Context, h: Handle) -> int:
        size: int = h.size
        return size

    def can_extents(self, next: Context, h: Handle) -> bool:
        next.can_extents()  # asked, as nbdkit does, though the answer is ours
        return True

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        next.can_fast_zero()
        return True  # zeroing the tail past the plugin is fast

    @staticmethod
    def _inside(h: _Sizes, count: int, offset: int) -> int:
        """How many of the bytes [offset, offset+count) the plugin has."""
        return 0 if offset >= h.real else min(count, h.real - offset)

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        n = self._inside(h, count, offset)
        if n == count:
            return next.pread(count, offset, flags)
        head = bytes(next.pread(n, offset, flags)) if n else b""
        return head + bytes(count - n)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        n = self._inside(h, len(buf), offset)
        if n:
            next.pwrite(buf if n == len(buf) else buf[:n], offset, flags)
        if n < len(buf) and bytes(memoryview(buf)[n:]).lstrip(b"\0"):
            raise PluginError("pwrite", "truncate: write beyond end of underlying device",
                              errno.ENOSPC, bare=True)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if n := self._inside(h, count, offset):
            next.trim(n, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if n := self._inside(h, count, offset):
            if flags & FLAG_FAST_ZERO and not next.can_fast_zero():
                raise FastZeroRefused
            next.zero(n, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if n := self._inside(h, count, offset):
            next.cache(n, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        if offset >= h.real:
            return [(h.real, h.size - h.real, EXTENT_HOLE | EXTENT_ZERO)]
        n = self._inside(h, count, offset)
        # Only what the plugin knows, cut at its end: the tail is asked about next time.
        out = []
        for start, length, kind in next.extents(n, offset, flags):
            kept = min(start + length, h.real) - start
            if kept > 0:
                out.append((start, kept, kind))
        return out
