"""nbdkit-count-filter(1) (nbdkit 1.46, newer than the 1.32 the other filters follow):
count the bytes read, written, zeroed and trimmed, and say so in one debug line when the
filter is unloaded (when the server exits): ``count bytes: read N, written N, zeroed N,
trimmed N``.  Only requests that succeed count.  No parameters."""

from __future__ import annotations

import threading

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle


class Filter(Backend):
    name = "count"
    config_help = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read = self.written = self.zeroed = self.trimmed = 0

    def unload(self) -> None:
        log.debug(f"count bytes: read {self.read}, written {self.written}, "
                  f"zeroed {self.zeroed}, trimmed {self.trimmed}")

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        data = next.pread(count, offset, flags)
        with self._lock:
            self.read += count
        return data

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        next.pwrite(buf, offset, flags)
        with self._lock:
            self.written += len(buf)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset, flags)
        with self._lock:
            self.trimmed += count

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset, flags)
        with self._lock:
            self.zeroed += count
