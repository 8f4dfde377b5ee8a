"""nbdkit-gzip-filter(1) (nbdkit 1.32): serve the uncompressed contents of the gzip file the
plugin serves, read-only.

gzip cannot be read at random, so the first connection decompresses all of it (the first
gzip member, as zlib's inflate stops there) into a temporary file in $TMPDIR (/var/tmp
without it), which is unlinked as soon as it is made (nothing is left behind, however the
server ends) and closed when the filter is unloaded.  Every connection then reads that
file.  No parameters.

The module is ``luanbd.filters.gzip``; ``import zlib`` below is the standard library's
(absolute imports), and this module never imports the standard ``gzip``.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
import zlib

from luanbd import log
from luanbd.backend.chain import Context
from luanbd.backend.interface import Handle, PluginError
from luanbd.filters.image import DecodedImage

#: Where the temporary file goes without $TMPDIR (nbdkit's LARGE_TMPDIR).
LARGE_TMPDIR = "/var/tmp"
#: How much is read from the plugin and inflated at a time (nbdkit's block_size).
BLOCK_SIZE = 4 * 1024 * 1024
#: zlib's Z_BUF_ERROR: inflate could make no progress (the input ended too soon).
Z_BUF_ERROR = -5
#: Python's words for a zlib error without zlib's own message.
_NO_MESSAGE = ("incomplete or truncated stream", "inconsistent stream state",
               "invalid input data", "library version mismatch")
_ZLIB_ERROR = re.compile(r"Error (-?\d+) while decompressing data(?:: (.*))?\Z", re.S)


def _inflate_error(err: zlib.error) -> str:
    """nbdkit's message for a failed inflate: zlib's message, or its error number."""
    m = _ZLIB_ERROR.match(str(err))
    if m is None:
        return f"gzip: inflate: {err}"
    if m.group(2) is None or m.group(2) in _NO_MESSAGE:
        return f"gzip: inflate: unknown error: {m.group(1)}"
    return f"gzip: inflate: {m.group(2)}"


class Filter(DecodedImage):
    name = "gzip"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fd = -1
        self.compressed_size = -1
        self.size = -1

    def unload(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(True)  # the plugin is never written
        with self.lock:  # nbdkit's prepare: the first connection decompresses
            if self.size < 0:
                try:
                    self._uncompress(next)
                except BaseException:
                    next.close()
                    raise
        return None

    def _uncompress(self, next: Context) -> None:
        self.compressed_size = next.get_size()
        tmpdir = os.environ.get("TMPDIR") or LARGE_TMPDIR
        try:
            fd, path = tempfile.mkstemp(dir=tmpdir)
        except OSError as err:
            raise PluginError("open", f"mkostemp: {tmpdir}: {err.strerror}", bare=True) from None
        os.unlink(path)
        if self.fd >= 0:  # an earlier connection failed half-way
            os.close(self.fd)
        self.fd = fd
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        total_in = total_out = 0
        while not inflater.eof:
            if total_in >= self.compressed_size:
                # inflate without input: Z_BUF_ERROR, which has no message (as nbdkit).
                raise PluginError("open", f"gzip: inflate: unknown error: {Z_BUF_ERROR}",
                                  bare=True)
            n = min(BLOCK_SIZE, self.compressed_size - total_in)
            data = bytes(next.pread(n, total_in, 0))
            total_in += n
            try:
                out = inflater.decompress(data)
            except zlib.error as err:
                raise PluginError("open", _inflate_error(err), bare=True) from None
            self._write(out, total_out)
            total_out += len(out)
        self.size = total_out
        log.debug(f"gzip: uncompressed size: {self.size}")

    def _write(self, buf: bytes, offset: int) -> None:
        view = memoryview(buf)
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as err:
                raise PluginError("open", f"write: {err.strerror}", bare=True) from None
            view = view[n:]
            offset += n

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        base = next.export_description()
        return None if base is None else b"expansion of gzip-compressed image: " + base

    def get_size(self, next: Context, h: Handle) -> int:
        if next.get_size() != self.compressed_size:
            raise PluginError("get_size", "plugin size changed unexpectedly: you must restart "
                              "luanbd so the gzip filter can uncompress the data again",
                              bare=True)
        return self.size

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        parts = []
        while count > 0:
            try:
                data = os.pread(self.fd, count, offset)
            except OSError as err:
                raise PluginError("pread", f"pread: {err.strerror}", err.errno or errno.EIO,
                                  bare=True) from None
            if not data:
                raise PluginError("pread", "pread: unexpected end of file", bare=True)
            parts.append(data)
            count -= len(data)
            offset += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)
