"""nbdkit-blocksize-filter(1): the plugin sees only requests aligned to ``minblock`` and
no bigger than ``maxdata`` (reads, writes) or ``maxlen`` (trim, zero, cache, extents); an
unaligned head or tail is read-modify-written (trims drop it), big requests are split."""

from __future__ import annotations

import threading
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FastZeroRefused,
    FuaMode,
    Handle,
    StartupError,
)
from luanbd.filters.params import size_parameter

MIN_LIMIT = 64 * 1024
_UINT_MAX = (1 << 32) - 1
_DEFAULT_MAXDATA = 64 * 1024 * 1024


def _parameter(key: str, value: str) -> int:
    n = size_parameter(key, value)
    if n == 0:
        raise StartupError(f"parameter '{key}' must be non-zero if specified")
    if n > _UINT_MAX:
        raise StartupError(f"parameter '{key}' too large")
    return n


class _Limits:
    """A connection's limits, fixed when it opens (nbdkit's .prepare)."""

    __slots__ = ("maxdata", "maxlen", "minblock")

    def __init__(self, minblock: int, maxdata: int, maxlen: int) -> None:
        self.minblock = minblock
        self.maxdata = maxdata
        self.maxlen = maxlen


def _aligned_extents(raw: list[tuple[int, int, int]], start: int, end: int,
                     align: int) -> list[tuple[int, int, int]]:
    """nbdkit_extents_aligned: extents from ``start`` (aligned) whose boundaries fall on
    ``align``; a block an unaligned boundary cuts has the types all its pieces share."""
    out: list[tuple[int, int, int]] = []
    pos = start
    pending: int | None = None  # the types of the partial block being built
    block_end = 0
    for off, length, kind in raw:
        e_end = min(off + length, end)
        if off > pos or e_end <= pos:
            if e_end <= pos:
                continue
            break  # a gap: stop at what is known
        while pos < e_end:
            if pending is None and pos % align == 0 and e_end - pos >= align:
                n = (e_end - pos) // align * align
                if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n, kind)
                else:
                    out.append((pos, n, kind))
                pos += n
                continue
            if pending is None:
                block_end = pos - pos % align + align
                pending = kind
            else:
                pending &= kind
            step = min(e_end, block_end) - pos
            pos += step
            if pos == block_end:
                if out and out[-1][2] == pending and out[-1][0] + out[-1][1] == pos - align:
                    out[-1] = (out[-1][0], out[-1][1] + align, pending)
                else:
                    out.append((pos - align, align, pending))
                pending = None
    if not out and pending is not None:
        # The plugin told less than one block: call it data (always true), so that the
        # client still makes progress.
        out.append((block_end - align, align, 0))
    return out


class Filter(Backend):
    name = "blocksize"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = ("minblock=<SIZE>      Minimum block size, power of 2 <= 64k (default 1).\n"
                   "maxdata=<SIZE>       Maximum size for read/write (default 64M).\n"
                   "maxlen=<SIZE>        Maximum size for trim/zero (default 4G-minblock).")

    def __init__(self) -> None:
        self.minblock = 0
        self.maxdata = 0
        self.maxlen = 0
        # Held across a read-modify-write, and by aligned writes so none lands inside one.
        self._lock = threading.Lock()

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "minblock":
            self.minblock = _parameter(key, value)
        elif key == "maxdata":
            self.maxdata = _parameter(key, value)
        elif key == "maxlen":
            self.maxlen = _parameter(key, value)
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        m = self.minblock
        if m:
            if m & (m - 1):
                raise StartupError("minblock must be a power of 2")
            if m > MIN_LIMIT:
                raise StartupError(f"minblock must not exceed {MIN_LIMIT}")
            if self.maxdata & (m - 1):
                raise StartupError(f"maxdata must be a multiple of {m}")
            if self.maxlen & (m - 1):
                raise StartupError(f"maxlen must be a multiple of {m}")
        next()

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        minimum, _, maximum = next.block_size() or (0, 0, 0)
        minblock = max(self.minblock, 1, minimum)
        maxdata = self.maxdata or (min(self.maxlen, _DEFAULT_MAXDATA) if self.maxlen
                                   else _DEFAULT_MAXDATA)
        if maximum:
            maxdata = min(maxdata, maximum)
        maxdata -= maxdata % minblock
        maxlen = (self.maxlen - self.maxlen % minblock if self.maxlen
                  else (1 << 32) - minblock)
        return _Limits(minblock, maxdata, maxlen)

    def get_size(self, next: Context, h: Handle) -> int:
        size = next.get_size()
        minblock: int = h.minblock
        return size - size % minblock

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        _, preferred, _ = next.block_size() or (0, 0, 0)
        return 1, max(preferred, 4096, h.minblock), _UINT_MAX

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        m: int = h.minblock
        parts: list[bytes | memoryview] = []
        if drop := offset % m:
            keep = min(m - drop, count)
            with self._lock:
                parts.append(bytes(next.pread(m, offset - drop, flags))[drop:drop + keep])
            offset += keep
            count -= keep
        while count >= m:
            keep = min(h.maxdata, count - count % m)
            parts.append(next.pread(keep, offset, flags))
            offset += keep
            count -= keep
        if count:
            with self._lock:
                parts.append(bytes(next.pread(m, offset, flags))[:count])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fua(self, next: Context, flags: int) -> tuple[int, bool]:
        """FUA the next layer only emulates becomes one flush at the end (as nbdkit)."""
        if flags & FLAG_FUA and next.can_fua() == FuaMode.EMULATE:
            return flags & ~FLAG_FUA, True
        return flags, False

    def _rmw(self, next: Context, h: Handle, at: int, data: bytes, flags: int) -> None:
        """Replace the bytes at ``at`` inside their one block."""
        m = h.minblock
        block = at - at % m
        with self._lock:
            buf = bytearray(next.pread(m, block, 0))
            buf[at - block:at - block + len(data)] = data
            next.pwrite(bytes(buf), block, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        flags, flush = self._fua(next, flags)
        m, view, count = h.minblock, memoryview(buf), len(buf)
        if drop := offset % m:
            keep = min(m - drop, count)
            self._rmw(next, h, offset, bytes(view[:keep]), flags)
            view, offset, count = view[keep:], offset + keep, count - keep
        while count >= m:
            keep = min(h.maxdata, count - count % m)
            with self._lock:
                next.pwrite(buf if keep == len(buf) else bytes(view[:keep]), offset, flags)
            view, offset, count = view[keep:], offset + keep, count - keep
        if count:
            self._rmw(next, h, offset, bytes(view), flags)
        if flush:
            next.flush(0)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        flags, flush = self._fua(next, flags)
        m = h.minblock
        if drop := offset % m:
            keep = min(m - drop, count)
            offset, count = offset + keep, count - keep
        count -= count % m
        while count:
            keep = min(h.maxlen, count)
            with self._lock:
                next.trim(keep, offset, flags)
            offset, count = offset + keep, count - keep
        if flush:
            next.flush(0)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        m = h.minblock
        if flags & FLAG_FAST_ZERO and ((offset | count) & (m - 1) or count > h.maxlen):
            # A split zero is not fast: refuse it at once (nbdkit: ENOTSUP).
            raise FastZeroRefused
        flags, flush = self._fua(next, flags)
        if drop := offset % m:
            keep = min(m - drop, count)
            self._rmw(next, h, offset, bytes(keep), flags & ~FLAG_MAY_TRIM)
            offset, count = offset + keep, count - keep
        while count >= m:
            keep = min(h.maxlen, count - count % m)
            with self._lock:
                next.zero(keep, offset, flags)
            offset, count = offset + keep, count - keep
        if count:
            self._rmw(next, h, offset, bytes(count), flags & ~FLAG_MAY_TRIM)
        if flush:
            next.flush(0)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        m = h.minblock
        start = offset - offset % m
        end = -(-(offset + count) // m) * m
        asked = min(-(-count // m) * m, h.maxlen)
        raw = next.extents(asked, start, flags)
        if m == 1:
            return raw
        return _aligned_extents(raw, start, end, m)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        m = h.minblock
        drop = offset % m
        offset -= drop
        remaining = -(-(count + drop) // m) * m
        while remaining:
            limit = min(h.maxdata, remaining)
            next.cache(limit, offset, flags)
            offset, remaining = offset + limit, remaining - limit
