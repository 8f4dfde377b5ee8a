"""The block files of the cow and cache filters: their reads and writes (nbdkit's ``call:
%m`` errors with the call's errno), and whole blocks read from the plugin below."""

from __future__ import annotations

import errno
import os

from luanbd.backend.chain import Context
from luanbd.backend.interface import PluginError


def failed(callback: str, call: str, err: OSError) -> PluginError:
    """A block file call failed: nbdkit's ``call: %m``, with its errno."""
    return PluginError(callback, f"{call}: {err.strerror}", err.errno or errno.EIO, bare=True)


def file_pread(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes of the file; zeroes past its end."""
    try:
        data = os.pread(fd, n, offset)
    except OSError as err:
        raise failed("pread", "pread", err) from None
    return data if len(data) == n else data + bytes(n - len(data))


def file_pwrite(fd: int, buf: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(buf)
    try:
        while view:
            done = os.pwrite(fd, view, offset)
            view = view[done:]
            offset += done
    except OSError as err:
        raise failed("pwrite", "pwrite", err) from None


def plugin_blocks(next: Context, offset: int, want: int, size: int) -> bytes:
    """``want`` bytes from the plugin at ``offset``, zero-padded past its end (``size``)."""
    n = max(0, min(want, size - offset))
    data = bytes(next.pread(n, offset, 0)) if n else b""
    return data + bytes(want - n)
