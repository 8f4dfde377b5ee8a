"""nbdkit-offset-filter(1): serve the byte range [offset, offset+range) of the plugin."""

from __future__ import annotations

from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError
from luanbd.filters.params import size_parameter


class Filter(Backend):
    name = "offset"
    config_help = ("offset=<OFFSET>      The start offset to serve (default 0).\n"
                   "range=<LENGTH>       The total size to serve (default: rest of file).")

    def __init__(self) -> None:
        self.offset = 0
        self.range: int | None = None

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "offset":
            self.offset = size_parameter(key, value)
        elif key == "range":
            self.range = size_parameter(key, value)
        else:
            next(key, value)

    def get_size(self, next: Context, h: Handle) -> int:
        real = next.get_size()
        if self.range is not None:
            if self.offset > real - self.range:
                raise PluginError("get_size", f"offset+range ({self.offset}+{self.range}) is "
                                              f"larger than the real size ({real}) of the "
                                              f"underlying file or device", bare=True)
            return self.range
        if self.offset > real:
            raise PluginError("get_size", f"offset ({self.offset}) is larger than the real "
                                          f"size ({real}) of the underlying file or device",
                              bare=True)
        return real - self.offset

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        return next.pread(count, offset + self.offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        next.pwrite(buf, offset + self.offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset + self.offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset + self.offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset + self.offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        shift = self.offset
        # The plugin's extents past our range end are cut off by the server (clip_extents
        # knows the export's size); those that begin before our offset are cut here.
        out = []
        for start, length, kind in next.extents(count, offset + shift, flags):
            ours = start - shift
            cut = max(0, -ours)
            if length > cut:
                out.append((ours + cut, length - cut, kind))
        return out
