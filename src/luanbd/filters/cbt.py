"""cbt: changed-block tracking (luanbd's own; nbdkit has no such filter).

Every block written, trimmed or zeroed since the server started (or since the last clear)
is marked in a bitmap, served as the metadata context ``qemu:dirty-bitmap:NAME`` (flag 1 =
changed), which is what incremental backup tools read: qemu's ``x-dirty-bitmap``,
``nbdinfo --map``.  Over any plugin.

* ``cbt-bitmap=NAME`` (default ``cbt``), ``cbt-blocksize=SIZE`` (default 64K, a power of
  two from 4K to 1G), ``cbt-file=PATH``: the bitmap survives restarts.
* A block is marked before the request is passed down: a write that fails half way may have
  changed data all the same.
* ``cbt-file``: loaded at start-up when its header says it was saved by a clean stop and
  matches the block size (and later the disk size); while serving the file says "in use",
  so after a crash everything counts as changed rather than a change being lost.  Each save
  is atomic (a temporary file, fsync, rename, fsync of the directory).
* SIGUSR1 starts a new generation: the bitmap is cleared (and saved), one log line.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import FLAG_REQ_ONE, Handle, StartupError
from luanbd.filters.params import size_parameter

_HEADER = struct.Struct(">8sIIQQI")  # magic, version, state, block size, disk size, crc32
_MAGIC, _VERSION = b"LUANBDCB", 1
_CLEAN, _IN_USE = 1, 2
_DIRTY_BYTE = re.compile(rb"[^\x00]")
_CLEAN_BYTE = re.compile(rb"[^\xff]")


def _ceil(n: int, d: int) -> int:
    return -(-n // d)


class Bitmap:
    """One bit per block, in a bytearray; every change under one lock."""

    def __init__(self, blksize: int) -> None:
        self.blksize = blksize
        self.size = 0
        self.bits = bytearray()
        self.lock = threading.Lock()

    def resize(self, size: int, dirty: bool) -> None:
        """Cover ``size`` bytes; new blocks are changed when ``dirty`` (a bigger disk than
        the saved bitmap knew: nothing is known of them)."""
        blocks = _ceil(size, self.blksize)
        old_blocks = _ceil(self.size, self.blksize)
        self.size = max(self.size, size)
        if blocks > old_blocks:
            self.bits.extend(bytes(_ceil(blocks, 8) - len(self.bits)))
            if dirty:
                self.mark(old_blocks, blocks)

    def mark(self, first: int, end: int) -> None:
        """Blocks [first, end) changed."""
        bits = self.bits
        while first < end and first % 8:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = (end - first) // 8
        if whole:
            bits[first >> 3:(first >> 3) + whole] = b"\xff" * whole
            first += whole * 8
        while first < end:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1

    def is_dirty(self, block: int) -> bool:
        return bool(self.bits[block >> 3] >> (block & 7) & 1)

    def run_end(self, block: int, end: int) -> int:
        """The first block from ``block`` on (before ``end``) whose state differs."""
        dirty = self.is_dirty(block)
        b = block + 1
        while b < end and b % 8:
            if self.is_dirty(b) != dirty:
                return b
            b += 1
        if b >= end:
            return end
        # Whole bytes of the same state at once, then the byte where it changes.
        found = (_CLEAN_BYTE if dirty else _DIRTY_BYTE).search(self.bits, b >> 3, _ceil(end, 8))
        b = found.start() * 8 if found else end
        while b < end and self.is_dirty(b) == dirty:
            b += 1
        return min(b, end)


def _save(path: str, bitmap: Bitmap, state: int) -> None:
    data = bytes(bitmap.bits)
    header = _HEADER.pack(_MAGIC, _VERSION, state, bitmap.blksize, bitmap.size,
                          zlib.crc32(data))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header + data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load(path: str, blksize: int) -> tuple[bytes, int] | str:
    """(bits, disk size) of a cleanly saved bitmap, or why everything counts as changed."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        return f"cannot read it ({err.strerror})"
    if len(raw) < _HEADER.size:
        return "it is too short"
    magic, version, state, bs, size, crc = _HEADER.unpack_from(raw)
    data = raw[_HEADER.size:]
    if magic != _MAGIC or version != _VERSION or zlib.crc32(data) != crc:
        return "it is not a bitmap of this version or is damaged"
    if state != _CLEAN:
        return "the server did not stop cleanly while it was in use"
    if bs != blksize:
        return f"it has another block size ({bs})"
    if len(data) != _ceil(_ceil(size, bs), 8):
        return "its length does not match its disk size"
    return data, size


class Filter(Backend):
    name = "cbt"
    config_help = ("cbt-bitmap=NAME          The context is qemu:dirty-bitmap:NAME (cbt).\n"
                   "cbt-blocksize=SIZE       Tracking granularity (64K).\n"
                   "cbt-file=PATH            Keep the bitmap in PATH across restarts.")

    def __init__(self) -> None:
        self.bitmap_name = b"cbt"
        self.blksize = 65536
        self.path: str | None = None
        self.bitmap = Bitmap(self.blksize)
        #: None: the saved bitmap was loaded (or there is none); else why all is changed.
        self._all_dirty: str | None = None
        self._loaded_size: int | None = None
        #: Counts clears: a write in flight across a clear is marked again after it.
        self._generation = 0

    @property
    def context(self) -> bytes:
        return b"qemu:dirty-bitmap:" + self.bitmap_name

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "cbt-bitmap":
            if not value or len(value) > 1000:
                raise StartupError("cbt-bitmap: the name must be 1 to 1000 bytes")
            self.bitmap_name = os.fsencode(value)
        elif key == "cbt-blocksize":
            n = size_parameter(key, value)
            if n < 4096 or n > 1 << 30 or n & (n - 1):
                raise StartupError("cbt-blocksize is out of range (4096..1G) or not a power "
                                   "of 2")
            self.blksize = n
        elif key == "cbt-file":
            self.path = value
        else:
            next(key, value)

    def get_ready(self) -> None:
        self.bitmap = Bitmap(self.blksize)
        if self.path is not None and os.path.exists(self.path):
            loaded = _load(self.path, self.blksize)
            if isinstance(loaded, str):
                self._all_dirty = loaded
                log.error(f"cbt: {self.path}: every block counts as changed: {loaded}")
            else:
                self.bitmap.bits[:] = loaded[0]
                self.bitmap.size = self._loaded_size = loaded[1]
        if self.path is not None:
            try:
                _save(self.path, self.bitmap, _IN_USE)
            except OSError as err:
                raise StartupError(f"cbt-file: {self.path}: {err.strerror}") from None
        # A new generation on request; signal handlers belong to the main thread, which
        # runs get_ready.
        signal.signal(signal.SIGUSR1, self._on_clear)

    def _on_clear(self, signum: int, frame: Any) -> None:
        # Not in the handler itself: with -s the main thread serves and may hold the lock.
        threading.Thread(target=self._clear, name="cbt-clear", daemon=True).start()

    def _clear(self) -> None:
        with self.bitmap.lock:
            self.bitmap.bits[:] = bytes(len(self.bitmap.bits))
            self._all_dirty = None
            self._generation += 1
            self._save(_IN_USE)
        log.error("cbt: bitmap cleared (SIGUSR1): a new generation starts")

    def _save(self, state: int) -> None:
        if self.path is None:
            return
        try:
            _save(self.path, self.bitmap, state)
        except OSError as err:
            log.error(f"cbt: {self.path}: cannot save the bitmap: {err.strerror}")

    def unload(self) -> None:
        # While "everything changed" is owed (no connection applied it yet, no clear), the
        # file stays "in use", so the next start owes it too.
        with self.bitmap.lock:
            self._save(_CLEAN if self._all_dirty is None else _IN_USE)

    # --- a connection -----------------------------------------------------------------
    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        size = next.get_size()
        with self.bitmap.lock:
            # Blocks a saved bitmap never covered are changed; a fresh one starts clean.
            self.bitmap.resize(size, dirty=self._loaded_size is not None)
            if self._all_dirty is not None:  # after an unclean stop, until a clear
                self.bitmap.mark(0, _ceil(self.bitmap.size, self.blksize))
        return None

    def meta_contexts(self, below: tuple[bytes, ...]) -> tuple[bytes, ...]:
        # The plugin's own contexts pass (offsets and data are the plugin's).
        return (*below, self.context)

    def _mark(self, count: int, offset: int) -> int:
        bs = self.blksize
        with self.bitmap.lock:
            self.bitmap.mark(offset // bs, _ceil(offset + count, bs))
            return self._generation

    def _changing(self, count: int, offset: int, call: Callable[[], None]) -> None:
        """Mark, then change: and if a clear came in between, mark again, so the new
        generation sees a write that landed after it began."""
        generation = self._mark(count, offset)
        try:
            call()
        finally:
            if self._generation != generation:
                self._mark(count, offset)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._changing(len(buf), offset, lambda: next.pwrite(buf, offset, flags))

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._changing(count, offset, lambda: next.trim(count, offset, flags))

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._changing(count, offset, lambda: next.zero(count, offset, flags))

    def meta_extents(self, next: Context, h: Handle, context: bytes,  # noqa: PLR0917
                     count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        if context != self.context:
            return next.meta_extents(context, count, offset, flags)
        bs, bitmap = self.blksize, self.bitmap
        block, end = offset // bs, _ceil(offset + count, bs)
        out: list[tuple[int, int, int]] = []
        with bitmap.lock:
            end = min(end, _ceil(bitmap.size, bs))
            while block < end:
                stop = bitmap.run_end(block, end)
                out.append((block * bs, (stop - block) * bs, int(bitmap.is_dirty(block))))
                block = stop
                if flags & FLAG_REQ_ONE:
                    break
        return out
