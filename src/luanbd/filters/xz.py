"""nbdkit-xz-filter(1) (nbdkit 1.32): serve the uncompressed contents of the xz file the
plugin serves, read-only.

Random access goes by the xz block index (filters/xzindex.py): a read decompresses only
the blocks it touches, and each connection keeps the last ``xz-max-depth`` blocks it
decompressed (an LRU cache, as nbdkit's blkcache).  A file with one big block is therefore
slow to read at random, as under nbdkit; ``xz --block-size=16M`` makes small blocks.

Parameters: ``xz-max-block=SIZE`` (default 512M: a file with a larger block is refused when
a client connects), ``xz-max-depth=N`` (default 4, as nbdkit 1.32's help says).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Context
from luanbd.backend.interface import (
    Handle,
    PluginError,
    StartupError,
    ThreadModel,
)
from luanbd.filters.image import DecodedImage
from luanbd.filters.params import parse_number, size_parameter
from luanbd.filters.xzindex import XzError, XzFile


class _Conn:
    """One connection's index and block cache."""

    def __init__(self) -> None:
        self.xz: XzFile | None = None
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0


class Filter(DecodedImage):
    name = "xz"
    config_help = (
        "xz-max-block=<SIZE> (optional) Maximum block size allowed (default: 512M)\n"
        "xz-max-depth=<N>    (optional) Maximum blocks in cache (default: 4)")

    def __init__(self) -> None:
        self.maxblock = 512 * 1024 * 1024
        self.maxdepth = 4

    @property
    def thread_model(self) -> ThreadModel:
        return ThreadModel.SERIALIZE_REQUESTS

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "xz-max-block":
            self.maxblock = size_parameter(key, value)
        elif key == "xz-max-depth":
            depth = parse_number("xz-max-depth", value)
            if depth == 0:
                raise StartupError("'xz-max-depth' parameter must be >= 1")
            self.maxdepth = depth
        else:
            next(key, value)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(True)  # the plugin is never written
        h = _Conn()
        # nbdkit's prepare: the index is read when the client opens the export.
        try:
            h.xz = XzFile(next)
        except XzError as err:
            next.close()
            raise PluginError("open", str(err), bare=True) from None
        if h.xz.max_block > self.maxblock:
            next.close()
            # nbdkit's message has several lines; log.error keeps one message to a line.
            lines = ["xz file largest block is bigger than maxblock",
                     "Either recompress the xz file with smaller blocks "
                     "(see nbdkit-xz-filter(1))",
                     "or make maxblock parameter bigger.",
                     f"maxblock = {self.maxblock} (bytes)"]
            for line in lines:
                log.error(line)
            raise PluginError("open", f"largest block in xz file = {h.xz.max_block} (bytes)",
                              bare=True)
        return h

    def close(self, next: Context, h: Handle) -> None:
        log.debug(f"cache: hits = {h.hits}, misses = {h.misses}")
        next.close()

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        base = next.export_description()
        return None if base is None else b"expansion of xz-compressed image: " + base

    def get_size(self, next: Context, h: Handle) -> int:
        size: int = h.xz.size
        return size

    def _block(self, next: Context, h: _Conn, offset: int) -> tuple[int, bytes]:
        """The start and data of the block holding ``offset``, from the cache or decoded."""
        assert h.xz is not None
        block = h.xz.locate(offset)
        data = h.cache.get(block.start)
        if data is not None:
            h.hits += 1
            h.cache.move_to_end(block.start)
            return block.start, data
        h.misses += 1
        data = h.xz.read_block(next, block)
        h.cache[block.start] = data
        while len(h.cache) > self.maxdepth:
            h.cache.popitem(last=False)
        return block.start, data

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        parts = []
        while count > 0:
            start, data = self._block(next, h, offset)
            at = offset - start
            n = min(count, len(data) - at)
            parts.append(memoryview(data)[at:at + n])
            offset += n
            count -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)
