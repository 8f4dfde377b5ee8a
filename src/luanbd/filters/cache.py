"""nbdkit-cache-filter(1) (nbdkit 1.32): a cache of the plugin's blocks in a file in $TMPDIR
(unlinked as soon as it is made, as nbdkit), shared by every connection.

``cache=writeback`` (the default) keeps writes in the cache as dirty blocks until a flush
(or a FUA write) writes them to the plugin; ``cache=writethrough`` writes each block to the
plugin at once; ``cache=unsafe`` ignores flushes.  ``cache-on-read=BOOL|/PATH`` keeps what
reads fetch; cache requests always do.  ``cache-min-block-size=`` (default 64K, or the
filesystem's block size if larger).  ``cache-max-size=`` with ``cache-high-threshold=`` and
``cache-low-threshold=`` (percentages): past high, least recently used clean blocks are
dropped (their space punched out of the file) until below low; dirty blocks are never dropped.
Trim and extents pass through to the plugin, as nbdkit's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    CacheMode,
    FastZeroRefused,
    FuaMode,
    Handle,
    LoggedError,
    PluginError,
    StartupError,
)
from luanbd.filters import blockfile
from luanbd.filters.blockfile import file_pread, file_pwrite, plugin_blocks
from luanbd.filters.cow import LARGE_TMPDIR
from luanbd.filters.params import bool_parameter, size_parameter
from luanbd.filters.partition import parse_unsigned

NOT_CACHED = 0
CLEAN = 1
DIRTY = 3

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Give a dropped block's space back (fallocate PUNCH_HOLE), where libc has it."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       ctypes.c_int64(offset), ctypes.c_int64(length))


class _Conn:
    __slots__ = ("next_fua",)

    def __init__(self) -> None:
        self.next_fua: FuaMode | None = None


class _Blocks:
    """The cache file and its block states, shared by every connection (nbdkit blk.c and
    reclaim.c); the methods are called with ``lock`` held."""

    def __init__(self) -> None:
        self.mode = "writeback"
        self.min_block_size = 65536
        self.max_size = -1
        self.hi_thresh = 95
        self.lo_thresh = 80
        self.on_read: bool | str = False
        self.blksize = 65536
        self.fd = -1
        self.size = 0
        self.bitmap = bytearray()
        #: Cached blocks, least recently used first (only kept with cache-max-size).
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.reclaiming = False
        #: Held by every block operation (nbdkit's one lock).
        self.lock = threading.RLock()

    def _on_read(self) -> bool:
        if isinstance(self.on_read, str):
            return os.path.exists(self.on_read)
        return self.on_read

    # --- blocks (self.lock held) ----------------------------------------------------------
    def _state(self, blknum: int) -> int:
        return self.bitmap[blknum] if blknum < len(self.bitmap) else NOT_CACHED

    def _all_cached(self, first: int, last: int) -> bool:
        bitmap = self.bitmap
        return last < len(bitmap) and bitmap.count(NOT_CACHED, first, last + 1) == 0

    def _mark(self, blknum: int, state: int) -> None:
        self.bitmap[blknum] = state
        if self.max_size >= 0:
            self.lru[blknum] = None
            self.lru.move_to_end(blknum)

    def _reclaim(self) -> None:
        """Past the high threshold, drop the least recently used clean blocks until below
        the low one (nbdkit's reclaim; dirty blocks stay)."""
        if self.max_size < 0:
            return
        bs = self.blksize
        if not self.reclaiming:
            if len(self.lru) * bs <= self.max_size * self.hi_thresh // 100:
                return
            self.reclaiming = True
        low = self.max_size * self.lo_thresh // 100
        for blknum in list(self.lru):
            if len(self.lru) * bs < low:
                break
            if self._state(blknum) == CLEAN:
                del self.lru[blknum]
                self.bitmap[blknum] = NOT_CACHED
                _punch_hole(self.fd, blknum * bs, bs)
        self.reclaiming = len(self.lru) * bs >= low

    def _file_pread(self, n: int, offset: int) -> bytes:
        return file_pread(self.fd, n, offset)

    def _file_pwrite(self, buf: bytes | bytearray | memoryview, offset: int) -> None:
        file_pwrite(self.fd, buf, offset)

    def _plugin_read(self, next: Context, blknum: int, nblocks: int) -> bytes:
        return plugin_blocks(next, blknum * self.blksize, nblocks * self.blksize, self.size)

    def _read(self, next: Context, blknum: int, nblocks: int) -> bytes:
        self._reclaim()
        parts = []
        end = blknum + nblocks
        bs = self.blksize
        while blknum < end:
            cached = self._state(blknum) != NOT_CACHED
            run = 1
            while blknum + run < end and (self._state(blknum + run) != NOT_CACHED) == cached:
                run += 1
            if cached:
                data = self._file_pread(run * bs, blknum * bs)
                for b in range(blknum, blknum + run):
                    if self.max_size >= 0:
                        self.lru.move_to_end(b)
            else:
                data = self._plugin_read(next, blknum, run)
                if self._on_read():
                    self._file_pwrite(data, blknum * bs)
                    for b in range(blknum, blknum + run):
                        self._mark(b, CLEAN)
            parts.append(data)
            blknum += run
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _writethrough(self, next: Context, blknum: int, block: bytes | bytearray | memoryview,
                      flags: int) -> None:
        offset = blknum * self.blksize
        n = min(self.blksize, self.size - offset)
        self._reclaim()
        self._file_pwrite(block, offset)
        next.pwrite(bytes(memoryview(block)[:n]), offset, flags)
        self._mark(blknum, CLEAN)

    def _write(self, next: Context, blknum: int, block: bytes | bytearray | memoryview,
               flags: int) -> None:
        if self.mode == "writethrough" or (self.mode == "writeback" and flags & FLAG_FUA):
            self._writethrough(next, blknum, block, flags)
            return
        self._reclaim()
        self._file_pwrite(block, blknum * self.blksize)
        self._mark(blknum, DIRTY)


class Filter(_Blocks, Backend):
    name = "cache"
    #: Written blocks may wait in the cache: the plugin's other contexts would lag behind.
    passes_meta_contexts = False
    config_help = ("cache=MODE                Set cache MODE, one of writeback (default),\n"
                   "                          writethrough, or unsafe.\n"
                   "cache-on-read=BOOL|/PATH  Set to true to cache on reads (default false).\n"
                   "cache-max-size=SIZE       Set maximum space used by cache.\n"
                   "cache-high-threshold=PCT  Percentage of max size where reclaim begins.\n"
                   "cache-low-threshold=PCT   Percentage of max size where reclaim ends.")

    # --- configuration --------------------------------------------------------------------
    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "cache":
            if value not in ("writeback", "writethrough", "unsafe"):
                raise StartupError("invalid cache parameter, should be "
                                   "writeback|writethrough|unsafe")
            self.mode = value
        elif key == "cache-min-block-size":
            n = size_parameter(key, value)
            if n < 4096 or n & (n - 1) or n > 0xFFFFFFFF:
                raise StartupError("cache-min-block-size is not a power of 2, or is too "
                                   "small or too large")
            self.min_block_size = n
        elif key == "cache-max-size":
            n = size_parameter(key, value)
            if n < 1024 * 1024:
                raise StartupError("cache-max-size is too small")
            self.max_size = n
        elif key in ("cache-high-threshold", "cache-low-threshold"):
            pct = parse_unsigned(key, value)
            if pct == 0:
                raise StartupError(f"{key} must be greater than zero")
            if key == "cache-high-threshold":
                self.hi_thresh = pct
            else:
                self.lo_thresh = pct
        elif key == "cache-on-read":
            self.on_read = value if value.startswith("/") else bool_parameter(value)
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        if self.max_size != -1 and self.lo_thresh >= self.hi_thresh:
            raise StartupError("cache-low-threshold must be less than cache-high-threshold")
        next()

    def get_ready(self) -> None:
        tmpdir = os.environ.get("TMPDIR") or LARGE_TMPDIR
        try:
            fd, path = tempfile.mkstemp(dir=tmpdir)
        except OSError as err:
            raise StartupError(f"mkostemp: {tmpdir}: {err.strerror}") from None
        os.unlink(path)
        self.fd = fd
        try:
            fs_block = os.fstatvfs(fd).f_bsize
        except OSError as err:
            raise StartupError(f"fstatvfs: {tmpdir}: {err.strerror}") from None
        self.blksize = max(self.min_block_size, fs_block)

    def unload(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- a connection ---------------------------------------------------------------------
    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        self.get_size(next, None)  # nbdkit's prepare
        return _Conn()

    def get_size(self, next: Context, h: Handle) -> int:
        size = next.get_size()
        with self.lock:
            self.size = size
            blockfile.resize(self.fd, self.bitmap, size, self.blksize)
        return size

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        return blockfile.block_size(next.block_size(), self.blksize)

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        return CacheMode.NATIVE

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return True  # nbdkit's answer, though every fast zero is refused

    def can_flush(self, next: Context, h: Handle) -> bool:
        return True if self.mode == "unsafe" else next.can_flush()

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        if self.mode == "unsafe":
            return FuaMode.NATIVE
        mode = next.can_fua()
        h.next_fua = mode
        return mode

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        # One cache for all connections; only writethrough leaves it to the plugin.
        return True if self.mode != "writethrough" else next.can_multi_conn()

    # --- data -----------------------------------------------------------------------------
    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        bs = self.blksize
        first, last = offset // bs, (offset + count - 1) // bs
        with self.lock:
            if self.max_size < 0 and self._all_cached(first, last):
                # Only the bytes asked for (the file holds each block at its own offset);
                # with cache-max-size the general path keeps the LRU order.
                return self._file_pread(count, offset)
            data = self._read(next, first, last - first + 1)
        at = offset - first * bs
        if at == 0 and len(data) == count:
            return data
        return memoryview(data)[at:at + count]

    def _need_flush(self, h: Handle, next: Context, flags: int) -> tuple[int, bool]:
        """nbdkit: FUA becomes a flush afterwards with cache=unsafe or an emulated FUA."""
        if flags & FLAG_FUA:
            if self.mode == "unsafe":
                return flags & ~FLAG_FUA, True
            if h.next_fua is None:
                h.next_fua = next.can_fua()
            if h.next_fua is FuaMode.EMULATE:
                return flags & ~FLAG_FUA, True
        return flags, False

    def _span(self, next: Context, count: int, offset: int, data: bytes | None,
              flags: int) -> None:
        """Write ``data`` (zeroes when None) block by block, partial blocks by
        read-modify-write."""
        bs = self.blksize
        view = None if data is None else memoryview(data)
        zeroes = bytes(bs)
        pos = 0
        kept_dirty = (self.max_size < 0 and self.mode != "writethrough"
                      and not (self.mode == "writeback" and flags & FLAG_FUA))
        while pos < count:
            blknum, at = divmod(offset + pos, bs)
            n = min(bs - at, count - pos)
            with self.lock:
                if n == bs and kept_dirty and view is not None:
                    # Whole blocks kept dirty: one file write for the run of them.
                    nblocks = (count - pos) // bs
                    self._file_pwrite(view[pos:pos + nblocks * bs], blknum * bs)
                    self.bitmap[blknum:blknum + nblocks] = bytes([DIRTY]) * nblocks
                    pos += nblocks * bs
                    continue
                if n == bs:
                    block: bytes | bytearray | memoryview = (
                        zeroes if view is None else view[pos:pos + bs])
                elif kept_dirty and self._state(blknum) != NOT_CACHED:
                    # A cached block kept dirty: only the changed bytes to the file (the
                    # plugin sees nothing of it until a flush, as with the whole block).
                    # Not with cache-max-size, whose reclaim may drop the block first.
                    self._file_pwrite(bytes(n) if view is None else view[pos:pos + n],
                                      blknum * bs + at)
                    self._mark(blknum, DIRTY)
                    pos += n
                    continue
                else:
                    block = bytearray(self._read(next, blknum, 1))
                    block[at:at + n] = bytes(n) if view is None else view[pos:pos + n]
                self._write(next, blknum, block, flags)
            pos += n

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        flags, need_flush = self._need_flush(h, next, flags)
        self._span(next, len(buf), offset, buf, flags)
        if need_flush:
            self.flush(next, h, 0)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if flags & FLAG_FAST_ZERO:
            raise FastZeroRefused  # never faster than writing, as nbdkit
        flags, need_flush = self._need_flush(h, next, flags & ~FLAG_MAY_TRIM)
        self._span(next, count, offset, None, flags)
        if need_flush:
            self.flush(next, h, 0)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        if self.mode == "unsafe":
            return
        first: PluginError | None = None
        with self.lock:
            for blknum in range(len(self.bitmap)):
                if self.bitmap[blknum] != DIRTY:
                    continue
                try:
                    block = self._read(next, blknum, 1)
                    self._writethrough(next, blknum, block, 0)
                except PluginError as err:
                    # As nbdkit: the plugin's message, this one, and on to the next block.
                    log.error(str(err))
                    log.error(f"cache: flush of block {blknum} failed")
                    first = first or err
        try:
            next.flush(0)
        except PluginError as err:
            if first is None:
                raise
            log.error(str(err))
        if first is not None:
            raise LoggedError(first.callback, first.message, first.errno, bare=True)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        bs = self.blksize
        with self.lock:
            for blknum in range(offset // bs, (offset + count - 1) // bs + 1):
                self._reclaim()
                if self._state(blknum) == NOT_CACHED:
                    data = self._plugin_read(next, blknum, 1)
                    self._file_pwrite(data, blknum * bs)
                    self._mark(blknum, CLEAN)
                else:
                    with contextlib.suppress(OSError, AttributeError):
                        os.posix_fadvise(self.fd, blknum * bs, bs, os.POSIX_FADV_WILLNEED)
                    if self.max_size >= 0:
                        self.lru.move_to_end(blknum)

