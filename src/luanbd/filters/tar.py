"""nbdkit-tar-filter(1) (nbdkit 1.32): serve one file inside the (uncompressed) tar file the
plugin serves, read and written in place.

``tar-entry=PATH`` (required, once) names the member; it must match the name stored in the
tar file exactly, without wildcards, as ``tar tf`` lists it (a directory's name, with or
without its trailing ``/``, gives the first member under it, as ``tar t DIR`` lists that
first).  The first connection finds where the member's data starts and how long it is;
every request then goes to the plugin at that offset, so writes change the tar file (use
``-r`` not to).  The member cannot be resized.

Unlike nbdkit 1.32, a member with a GNU long name (``././@LongLink``) is served from its
data: nbdkit takes the block number GNU tar prints, which is the long-name header's, and
serves the bytes from the long name's block on.

nbdkit runs GNU tar (``tar=PROGRAM``) over the plugin's data to find the member; luanbd
reads the headers with the standard library's :mod:`tarfile` instead, reading the plugin
only as far as the member's header.  ``tar=`` is accepted for compatibility and not used.
nbdkit 1.32 has no ``tar-limit=`` (later versions' limit on that reading): here, as under
nbdkit 1.32, such a key goes to the plugin.
"""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError, StartupError

#: How much of the plugin a read of the headers asks for at a time.
READ_SIZE = 64 * 1024


class PluginFile(io.RawIOBase):
    """The plugin's data as a read-only, seekable file (for :mod:`tarfile`)."""

    def __init__(self, next: Context) -> None:
        super().__init__()
        self.next = next
        self.size = next.get_size()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self.size - self.pos))
        if n:
            buffer[:n] = self.next.pread(n, self.pos, 0)
            self.pos += n
        return n


def find_member(next: Context, entry: str) -> tuple[int, int]:
    """(offset of the data, size) of member ``entry`` of the tar file; ValueError if it is
    not there or this is not a tar file.  As GNU tar lists a name, a directory's name
    matches the first member under it."""
    wanted = entry.rstrip("/") or entry
    try:
        with (io.BufferedReader(PluginFile(next), READ_SIZE) as f,
              tarfile.open(fileobj=f, mode="r:") as tar):
            while (member := tar.next()) is not None:
                if member.name == wanted or member.name.startswith(wanted + "/"):
                    return member.offset_data, member.size
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(str(err)) from None
    raise ValueError(f"{entry}: not found in the tar file")


class Filter(Backend):
    name = "tar"
    config_help = ("tar-entry=<FILENAME> (required) The path inside the tar file to serve.\n"
                   "tar=<PATH>                      Path of the tar binary (not used).")

    def __init__(self) -> None:
        self.entry: str | None = None
        self.lock = threading.Lock()
        self.found: tuple[int, int] | None = None

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "tar-entry":
            if self.entry is not None:
                raise StartupError("only one tar-entry parameter can be given")
            self.entry = value
        elif key != "tar":
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        if self.entry is None:
            raise StartupError("you must supply the tar-entry=<FILENAME> parameter")
        next()

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        with self.lock:  # nbdkit's prepare: the first connection finds the member
            if self.found is None:
                assert self.entry is not None
                try:
                    self.found = find_member(next, self.entry)
                except ValueError as err:
                    log.debug(f"tar: {err}")
                    next.close()
                    raise PluginError("open", "tar subcommand failed, check that the file "
                                      "really exists in the tarball", bare=True) from None
                except BaseException:
                    next.close()
                    raise
                log.debug(f"tar: {self.entry} found at offset {self.found[0]}, "
                          f"size {self.found[1]}")
        return self.found

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        base = next.export_description()
        if base is None:
            return None
        return f"embedded {self.entry} from within tar file: ".encode() + base

    def get_size(self, next: Context, h: Handle) -> int:
        next.get_size()
        size: int = h[1]
        return size

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        return next.pread(count, offset + h[0], flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        next.pwrite(buf, offset + h[0], flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset + h[0], flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset + h[0], flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset + h[0], flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        shift, size = h
        out = []
        for start, length, kind in next.extents(count, offset + shift, flags):
            # Only the member's part: nbdkit's extents list is bounded by it.
            lo, hi = max(start, shift + offset), min(start + length, shift + size)
            if hi > lo:
                out.append((lo - shift, hi - lo, kind))
        return out
