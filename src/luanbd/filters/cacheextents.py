"""nbdkit-cacheextents-filter(1): the last extents answer of the plugin is kept (one for
the whole server, as nbdkit's) and answers every extents request that starts inside it,
until a write, trim or zero forgets it.  A miss asks the plugin without REQ_ONE, for as
much as it will tell."""

from __future__ import annotations

import itertools
import threading

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import FLAG_REQ_ONE, Handle


def _valid(got: list[tuple[int, int, int]], offset: int) -> bool:
    """Only an answer nbdkit_add_extent would have taken is kept: ascending, contiguous,
    from the offset on (a bad one is the plugin's error now, not a wrong answer later)."""
    if not got or got[0][0] != offset:
        return False
    return all(a + n == b for (a, n, _), (b, _, _) in itertools.pairwise(got))


class Filter(Backend):
    name = "cacheextents"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: list[tuple[int, int, int]] | None = None
        self._start = self._end = 0

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        with self._lock:
            if self._cache is not None and self._start <= offset < self._end:
                cached = self._cache
            else:
                got = [e for e in next.extents(count, offset, flags & ~FLAG_REQ_ONE)
                       if e[1] > 0]
                got = [(max(start, offset), start + length - max(start, offset), kind)
                       for start, length, kind in got if start + length > offset]
                if _valid(got, offset):
                    self._cache = got
                    self._start = got[0][0]
                    self._end = got[-1][0] + got[-1][1]
                return got
        # nbdkit_add_extent drops what lies before the request's offset.
        return [(max(start, offset), start + length - max(start, offset), kind)
                for start, length, kind in cached if start + length > offset]

    def _forget(self) -> None:
        with self._lock:
            self._cache = None

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._forget()
        next.pwrite(buf, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._forget()
        next.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._forget()
        next.zero(count, offset, flags)
