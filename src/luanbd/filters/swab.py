"""nbdkit-swab-filter(1): the bytes of each 16- (default), 32- or 64-bit word swapped
(``swab-bits=8|16|32|64``; 8 swaps nothing); the size is rounded down to whole words and
requests not aligned to a word fail with EINVAL; extents are rounded to words (a word two
extents share gets the types both have, as nbdkit_extents_aligned)."""

from __future__ import annotations

import array
import errno
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError, StartupError
from luanbd.backend.password import parse_int


def swap(buf: bytes | memoryview, width: int) -> bytes:
    """The bytes of each ``width``-byte word of ``buf`` reversed."""
    if width == 1:
        return bytes(buf)
    words = array.array({2: "H", 4: "I", 8: "Q"}[width])
    assert words.itemsize == width
    words.frombytes(memoryview(buf).cast("B"))
    words.byteswap()
    return words.tobytes()


def aligned_extents(next: Context, count: int, offset: int, flags: int,
                    align: int) -> list[tuple[int, int, int]]:
    """nbdkit_extents_aligned: the extents of [offset, offset+count) with every boundary a
    multiple of ``align``; the block an unaligned boundary falls in has the types of all
    the extents it overlaps (ANDed)."""
    exts: list[list[int]] = []
    end = offset + count
    pos = offset
    while True:
        for start, length, kind in next.extents(end - pos, pos, flags):
            s, e = max(start, pos), start + length
            if e > s:
                exts.append([s, e, kind])
                pos = e
        if not exts or exts[-1][1] - offset >= align or pos >= end:
            break  # the first block is covered: enough for an answer
    out: list[tuple[int, int, int]] = []
    cur = offset
    i = 0
    while i < len(exts):
        s, e, kind = exts[i]
        if e <= cur:
            i += 1
            continue
        whole = e - e % align
        if whole > cur:
            out.append((cur, whole - cur, kind))
            cur = whole
        if e == cur:
            i += 1
            continue
        block_end = cur + align
        j, typ = i + 1, kind
        while j < len(exts) and exts[j][0] < block_end:
            typ &= exts[j][2]
            if exts[j][1] >= block_end:
                break
            j += 1
        if j == len(exts):
            break  # not known to the block's end: stop at the last whole block
        out.append((cur, align, typ))
        cur = block_end
        i = j
    return out


class _Handle:
    __slots__ = ("extents",)

    def __init__(self) -> None:
        #: The next layer's can_extents, once asked.
        self.extents: bool | None = None


class Filter(Backend):
    name = "swab"
    config_help = "swab-bits=8|16|32|64       Size of byte swap (default 16)."

    def __init__(self) -> None:
        self.bits = 16

    @property
    def width(self) -> int:
        return self.bits // 8

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "swab-bits":
            self.bits = parse_int("swab-bits", value)
            if self.bits not in (8, 16, 32, 64):
                raise StartupError("invalid swab-bits, must be 8, 16, 32 or 64")
        else:
            next(key, value)

    def get_size(self, next: Context, h: Handle) -> int:
        size = next.get_size()
        return size - size % self.width

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        sizes = next.block_size()
        if sizes is None or sizes[0] == 0:
            return (self.width, 512, 0xFFFFFFFF)
        return (max(sizes[0], self.width), sizes[1], sizes[2])

    def _check(self, fn: str, count: int, offset: int) -> None:
        if count % self.width or offset % self.width:
            raise PluginError(fn, "swab: requests to this filter must be aligned",
                              errno.EINVAL, bare=True)

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        self._check("pread", count, offset)
        return swap(next.pread(count, offset, flags), self.width)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._check("pwrite", len(buf), offset)
        next.pwrite(swap(buf, self.width), offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check("trim", count, offset)
        next.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check("zero", count, offset)
        next.zero(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check("cache", count, offset)
        next.cache(count, offset, flags)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        return _Handle()

    def can_extents(self, next: Context, h: Handle) -> bool:
        h.extents = next.can_extents()
        return bool(h.extents)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        if h.extents is None:
            h.extents = next.can_extents()
        if not h.extents:
            # nbdkit does not call a layer without extents: all of it is data.
            return [(offset, count, 0)]
        self._check("extents", count, offset)
        return aligned_extents(next, count, offset, flags, self.width)

