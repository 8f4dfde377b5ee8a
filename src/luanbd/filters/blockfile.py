"""The block files of the cow and cache filters: their reads and writes (nbdkit's ``call:
%m`` errors with the call's errno), their size, whole blocks read from the plugin below, and
the block size they advertise (nbdkit's blk.c, shared by both)."""

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


def resize(fd: int, bitmap: bytearray, size: int, blksize: int) -> None:
    """The file and its per-block bitmap cover ``size`` bytes of whole blocks (new blocks
    in state 0); the caller holds the filter's lock."""
    nblocks = -(-size // blksize)
    if nblocks > len(bitmap):
        bitmap.extend(bytes(nblocks - len(bitmap)))
    else:
        del bitmap[nblocks:]
    try:
        os.ftruncate(fd, nblocks * blksize)
    except OSError as err:
        raise failed("get_size", "ftruncate", err) from None


def block_size(sizes: tuple[int, int, int] | None, blksize: int) -> tuple[int, int, int]:
    """The block size over a layer of ``blksize`` blocks: the plugin's, preferring whole
    blocks where its maximum allows."""
    if sizes is None or sizes[0] == 0:
        return (1, blksize, 0xFFFFFFFF)
    minimum, preferred, maximum = sizes
    if maximum >= blksize:
        preferred = max(preferred, blksize)
    return (minimum, preferred, maximum)
