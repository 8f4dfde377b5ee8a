"""nbdkit-cow-filter(1) (nbdkit 1.32): a temporary writable overlay on top of the plugin.

The plugin is opened read-only and never written: writes, zeroes and trims go to blocks of
an overlay file in $TMPDIR (unlinked as soon as it is made, as nbdkit), reads come from the
overlay for the blocks it holds and from the plugin for the others.  One overlay serves
every connection (nbdkit's is global too), so the export may advertise multi-conn.

Parameters: ``cow-block-size=N`` (a power of 2, 4K..2G, default 64K), ``cow-on-cache=BOOL``
(cache requests copy the plugin's blocks into the overlay), ``cow-on-read=BOOL|/PATH`` (reads
do; with a path, while it exists).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    FLAG_FAST_ZERO,
    FLAG_REQ_ONE,
    CacheMode,
    FastZeroRefused,
    FuaMode,
    Handle,
    PluginError,
    StartupError,
    ZeroMode,
)
from luanbd.filters import blockfile
from luanbd.filters.blockfile import failed as _failed
from luanbd.filters.blockfile import file_pread, file_pwrite, plugin_blocks
from luanbd.filters.params import bool_parameter, size_parameter

#: Block states in the bitmap (nbdkit blk.c's).
NOT_ALLOCATED = 0
ALLOCATED = 1
TRIMMED = 3

#: The metadata context cow serves (qemu's name and meaning: which layer holds a block).
ALLOCATION_DEPTH = b"qemu:allocation-depth"
_ALLOCATED_BLOCK = re.compile(rb"[^\x00]")

#: Where the overlay goes without $TMPDIR (nbdkit's LARGE_TMPDIR).
LARGE_TMPDIR = "/var/tmp"



class Overlay:
    """The overlay file and its block bitmap (nbdkit blk.c), shared by all connections.

    ``lock`` is held by every change to the overlay: a block's data is written and only
    then marked allocated, and blocks copied from the plugin (cow-on-read, cow-on-cache) are
    saved only if nothing was written to them meanwhile, so an acknowledged write is never
    overwritten by older data."""

    def __init__(self, blksize: int) -> None:
        self.blksize = blksize
        self.fd = -1
        self.size = 0
        self.bitmap = bytearray()
        self.lock = threading.RLock()

    def create(self) -> None:
        tmpdir = os.environ.get("TMPDIR") or LARGE_TMPDIR
        try:
            fd, path = tempfile.mkstemp(dir=tmpdir)
        except OSError as err:
            raise StartupError(f"mkostemp: {tmpdir}: {err.strerror}") from None
        os.unlink(path)
        self.fd = fd

    def free(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_size(self, size: int) -> None:
        with self.lock:
            self.size = size
            blockfile.resize(self.fd, self.bitmap, size, self.blksize)

    def state(self, blknum: int) -> int:
        return self.bitmap[blknum] if blknum < len(self.bitmap) else NOT_ALLOCATED

    def same_state(self, first: int, last: int) -> int | None:
        """The state of blocks ``first..last`` if they all have the same one."""
        state = self.state(first)
        if first == last or self.bitmap.count(state, first, last + 1) == last + 1 - first:
            return state
        return None

    # --- whole blocks -----------------------------------------------------------------
    def _pread(self, n: int, offset: int) -> bytes:
        return file_pread(self.fd, n, offset)

    def _pwrite(self, buf: bytes | bytearray | memoryview, offset: int) -> None:
        file_pwrite(self.fd, buf, offset)

    def _plugin(self, next: Context, blknum: int, nblocks: int) -> bytes:
        """Blocks from the plugin; the last one zero-padded past the plugin's end."""
        return plugin_blocks(next, blknum * self.blksize, nblocks * self.blksize, self.size)

    def read(self, next: Context, blknum: int, nblocks: int, save: bool) -> bytes:
        """Blocks ``blknum``.. as the client sees them; ``save``: copy what came from the
        plugin into the overlay (cow-on-read)."""
        parts = []
        end = blknum + nblocks
        while blknum < end:
            state = self.state(blknum)
            run = 1
            while blknum + run < end and self.state(blknum + run) == state:
                run += 1
            if state == NOT_ALLOCATED:
                data = self._plugin(next, blknum, run)
                if save:
                    self.save(blknum, data)
            elif state == ALLOCATED:
                data = self._pread(run * self.blksize, blknum * self.blksize)
            else:
                data = bytes(run * self.blksize)
            parts.append(data)
            blknum += run
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def save(self, blknum: int, data: bytes) -> None:
        """Plugin data into blocks that are still unallocated."""
        bs = self.blksize
        with self.lock:
            for i in range(len(data) // bs):
                if self.state(blknum + i) == NOT_ALLOCATED:
                    self._pwrite(memoryview(data)[i * bs:(i + 1) * bs], (blknum + i) * bs)
                    self.bitmap[blknum + i] = ALLOCATED

    def write(self, blknum: int, data: bytes | bytearray | memoryview) -> None:
        """Whole blocks of new data."""
        with self.lock:
            self._pwrite(data, blknum * self.blksize)
            self.bitmap[blknum:blknum + len(data) // self.blksize] = (
                bytes([ALLOCATED]) * (len(data) // self.blksize))

    def modify(self, next: Context, blknum: int, at: int, data: bytes | None, *, n: int,
               save: bool) -> None:
        """Read-modify-write of one block: ``n`` bytes from ``at`` become ``data`` (zeroes
        when None)."""
        with self.lock:
            if self.state(blknum) == ALLOCATED:  # the rest of the block is there already
                self._pwrite(bytes(n) if data is None else data, blknum * self.blksize + at)
                return
            block = bytearray(self.read(next, blknum, 1, save))
            block[at:at + n] = bytes(n) if data is None else data
            self.write(blknum, block)

    def trim(self, blknum: int, nblocks: int) -> None:
        with self.lock:
            self.bitmap[blknum:blknum + nblocks] = bytes([TRIMMED]) * nblocks

    def fadvise(self, blknum: int) -> None:
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd, blknum * self.blksize, self.blksize,
                                 os.POSIX_FADV_WILLNEED)
            except OSError as err:
                raise _failed("cache", "posix_fadvise", err) from None


class _Conn:
    """A connection's answers from the plugin, asked once."""

    __slots__ = ("can_cache", "can_extents", "size")

    def __init__(self) -> None:
        self.size = 0
        self.can_cache = CacheMode.NONE
        self.can_extents: bool | None = None


class Filter(Backend):
    name = "cow"
    config_help = ("cow-block-size=<N>       Set COW block size.\n"
                   "cow-on-cache=<BOOL>      Copy cache (prefetch) requests to the overlay.\n"
                   "cow-on-read=<BOOL>|/PATH Copy read requests to the overlay.")

    def __init__(self) -> None:
        self.blksize = 65536
        self.on_cache = False
        self.on_read: bool | str = False
        self.overlay = Overlay(self.blksize)

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "cow-block-size":
            n = size_parameter(key, value)
            if n < 4096 or n > 0xFFFFFFFF or n & (n - 1):
                raise StartupError("cow-block-size is out of range (4096..2G) or not a "
                                   "power of 2")
            self.blksize = n
        elif key == "cow-on-cache":
            self.on_cache = bool_parameter(value)
        elif key == "cow-on-read":
            self.on_read = value if value.startswith("/") else bool_parameter(value)
        else:
            next(key, value)

    def get_ready(self) -> None:
        self.overlay = Overlay(self.blksize)
        self.overlay.create()

    def unload(self) -> None:
        self.overlay.free()

    def _on_read(self) -> bool:
        if isinstance(self.on_read, str):
            return os.path.exists(self.on_read)
        return self.on_read

    # --- a connection ---------------------------------------------------------------------
    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(True)  # the plugin is never written
        h = _Conn()
        self.get_size(next, h)  # nbdkit's prepare: the overlay takes the plugin's size
        return h

    def get_size(self, next: Context, h: Handle) -> int:
        size = next.get_size()
        self.overlay.set_size(size)
        h.size = size
        return size

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        return blockfile.block_size(next.block_size(), self.blksize)

    def can_write(self, next: Context, h: Handle) -> bool:
        return True

    def can_trim(self, next: Context, h: Handle) -> bool:
        return True

    def can_extents(self, next: Context, h: Handle) -> bool:
        return True

    def can_flush(self, next: Context, h: Handle) -> bool:
        return True

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        return FuaMode.NATIVE

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        h.can_cache = next.can_cache()  # what cache does with the plugin
        return CacheMode.NATIVE

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        return True  # one overlay for every connection

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        # nbdkit 1.32 asks the plugin, opened read-only, so WRITE_ZEROES is not advertised
        # (zero below stays for a client that sends it anyway).
        return ZeroMode.NONE

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return True  # nbdkit's answer, though every fast zero is refused

    # --- data -----------------------------------------------------------------------------
    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        bs = self.blksize
        first, last = offset // bs, (offset + count - 1) // bs
        ov = self.overlay
        state = ov.same_state(first, last)
        # All in the overlay, or all trimmed: only the bytes asked for (the file holds
        # each block at its own offset).  The plugin is still asked for whole blocks, as
        # nbdkit asks it.
        if state == ALLOCATED:
            return file_pread(ov.fd, count, offset)
        if state == TRIMMED:
            return bytes(count)
        data = ov.read(next, first, last - first + 1, self._on_read())
        at = offset - first * bs
        if at == 0 and len(data) == count:
            return data
        return memoryview(data)[at:at + count]

    def _span(self, next: Context, count: int, offset: int, data: bytes | None,
              whole: Callable[[int, int, int], None]) -> None:
        """Unaligned head and tail by read-modify-write; ``whole(blknum, nblocks, pos)``
        for the aligned body (``pos``: where it starts in the request)."""
        bs = self.blksize
        ov = self.overlay
        save = self._on_read()
        pos = 0
        blknum, at = divmod(offset, bs)
        if at:
            n = min(bs - at, count)
            ov.modify(next, blknum, at, None if data is None else data[:n], n=n,
                      save=save)
            pos += n
            blknum += 1
        nblocks = (count - pos) // bs
        if nblocks:
            whole(blknum, nblocks, pos)
            pos += nblocks * bs
            blknum += nblocks
        if pos < count:
            n = count - pos
            ov.modify(next, blknum, 0, None if data is None else data[pos:], n=n,
                      save=save)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        view = memoryview(buf)
        bs = self.blksize

        def whole(blknum: int, nblocks: int, pos: int) -> None:
            self.overlay.write(blknum, view[pos:pos + nblocks * bs])

        self._span(next, len(buf), offset, buf, whole)
        # FUA has nothing to do: the overlay goes away with the server anyway.

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if flags & FLAG_FAST_ZERO:
            raise FastZeroRefused  # never faster than writing, as nbdkit
        bs = self.blksize
        zeroes = bytes(bs)

        def whole(blknum: int, nblocks: int, pos: int) -> None:
            for i in range(nblocks):
                self.overlay.write(blknum + i, zeroes)

        self._span(next, count, offset, None, whole)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._span(next, count, offset, None,
                   lambda blknum, nblocks, pos: self.overlay.trim(blknum, nblocks))

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        pass  # nothing to the plugin

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        bs = self.blksize
        ov = self.overlay
        mode = "cow" if self.on_cache else {CacheMode.NONE: "ignore",
                                            CacheMode.EMULATE: "read",
                                            CacheMode.NATIVE: "passthrough"}[h.can_cache]
        for blknum in range(offset // bs, (offset + count - 1) // bs + 1):
            state = ov.state(blknum)
            if state == ALLOCATED:
                ov.fadvise(blknum)
            elif state == TRIMMED or mode == "ignore":
                continue
            elif mode == "passthrough":
                start = blknum * bs
                next.cache(min(bs, h.size - start), start, 0)
            else:
                data = ov._plugin(next, blknum, 1)
                if mode == "cow":
                    ov.save(blknum, data)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        if h.can_extents is None:
            h.can_extents = next.can_extents()
        bs = self.blksize
        ov = self.overlay
        blknum = offset // bs
        end_blk = (offset + count + bs - 1) // bs
        out: list[tuple[int, int, int]] = []
        while blknum < end_blk:
            state = ov.state(blknum)
            if state != NOT_ALLOCATED:
                kind = EXTENT_HOLE | EXTENT_ZERO if state == TRIMMED else 0
                out.append((blknum * bs, bs, kind))
                blknum += 1
            elif h.can_extents:
                # As many unallocated blocks as follow, in one question to the plugin.
                run = 1
                while (blknum + run < end_blk and run * bs < 0xFFFFFFFF - bs + 1
                       and ov.state(blknum + run) == NOT_ALLOCATED):
                    run += 1
                start = blknum * bs
                out += self._plugin_extents(next, start, min(run * bs, h.size - start), flags)
                blknum += run
            else:
                out.append((blknum * bs, bs, 0))
                blknum += 1
            if flags & FLAG_REQ_ONE:
                break
        return out

    # The plugin's other contexts do not see the overlay's writes: only this one is served.
    def meta_contexts(self, below: tuple[bytes, ...]) -> tuple[bytes, ...]:
        return (ALLOCATION_DEPTH,)

    def meta_extents(self, next: Context, h: Handle, context: bytes,  # noqa: PLR0917
                     count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        """qemu:allocation-depth (as qemu's server): 1 where the overlay holds the block
        (written, zeroed, trimmed or copied up), 2 where it is read from the plugin."""
        bs, bitmap = self.blksize, self.overlay.bitmap
        blknum, end_blk = offset // bs, (offset + count + bs - 1) // bs
        out: list[tuple[int, int, int]] = []
        while blknum < end_blk:
            if blknum >= len(bitmap):
                stop, depth = end_blk, 2
            elif bitmap[blknum] == NOT_ALLOCATED:
                found = _ALLOCATED_BLOCK.search(bitmap, blknum, min(end_blk, len(bitmap)))
                stop, depth = (found.start() if found else min(end_blk, len(bitmap))), 2
            else:
                found_at = bitmap.find(NOT_ALLOCATED, blknum, end_blk)
                stop, depth = (found_at if found_at >= 0 else min(end_blk, len(bitmap))), 1
            out.append((blknum * bs, (stop - blknum) * bs, depth))
            blknum = stop
            if flags & FLAG_REQ_ONE:
                break
        return out

    @staticmethod
    def _plugin_extents(next: Context, offset: int, count: int,
                        flags: int) -> list[tuple[int, int, int]]:
        """nbdkit_extents_full: the plugin's extents covering exactly [offset, +count)."""
        end = offset + count
        pos = offset
        out: list[tuple[int, int, int]] = []
        while pos < end:
            got = next.extents(end - pos, pos, flags & ~FLAG_REQ_ONE)
            before = pos
            for start, length, kind in got:
                stop = min(start + length, end)
                if stop <= pos or start > pos:
                    continue
                out.append((pos, stop - pos, kind))
                pos = stop
            if pos == before:
                raise PluginError("extents", "the plugin returned no extent covering the "
                                             "offset")
        return out
