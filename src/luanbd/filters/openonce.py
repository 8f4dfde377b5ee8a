"""nbdkit-openonce-filter(1) (nbdkit 1.44, newer than the 1.32 the other filters follow):
the plugin is opened once per (read-only, TLS, export name) and that one handle serves every
later connection asking for the same; it stays open until the server stops (cleanup closes
them).  No parameters.

As nbdkit's, the filter tightens the thread model so that one plugin handle is never called
from two connections at once.  nbdkit does that only for serialize_requests plugins; luanbd
gives each connection of a parallel (or serialize_requests) script a Lua state of its own,
and one handle lives in one Lua state, so here the chain always runs serialize_all_requests:
every connection shares the one Lua state and requests are served one at a time.
"""

from __future__ import annotations

import threading

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import CacheMode, FuaMode, Handle, ThreadModel, ZeroMode


class Filter(Backend):
    name = "openonce"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (readonly, is_tls, export name) -> the opened context of the layers below.
        self.exports: dict[tuple[bool, bool, bytes], Context] = {}

    @property
    def thread_model(self) -> ThreadModel:
        return ThreadModel.SERIALIZE_ALL_REQUESTS

    def cleanup(self) -> None:
        with self._lock:
            exports, self.exports = self.exports, {}
        for (_, _, name), ctx in exports.items():
            log.debug(f'openonce: freeing context for export "{name.decode(errors="replace")}"')
            ctx.close()

    def open(self, next: Context, readonly: bool) -> Handle:
        info = current.connection()
        name = (info.export_name if info is not None else None) or b""
        key = (readonly, info is not None and info.is_tls, name)
        shown = name.decode(errors="replace")
        with self._lock:
            ctx = self.exports.get(key)
            if ctx is not None:
                log.debug(f'openonce: reusing existing context for export "{shown}"')
                return ctx
            next.open(readonly)
            self.exports[key] = next
            log.debug(f'openonce: allocated new context for export "{shown}"')
            return next

    def close(self, next: Context, h: Handle) -> None:
        pass  # the plugin stays open until the server stops

    # --- every call goes to the shared context ------------------------------------------
    def get_size(self, next: Context, h: Handle) -> int:
        return int(h.get_size())

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        sizes: tuple[int, int, int] | None = h.block_size()
        return sizes

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        text: bytes | None = h.export_description()
        return text

    def can_write(self, next: Context, h: Handle) -> bool:
        return bool(h.can_write())

    def can_flush(self, next: Context, h: Handle) -> bool:
        return bool(h.can_flush())

    def is_rotational(self, next: Context, h: Handle) -> bool:
        return bool(h.is_rotational())

    def can_trim(self, next: Context, h: Handle) -> bool:
        return bool(h.can_trim())

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        return ZeroMode(h.can_zero())

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return bool(h.can_fast_zero())

    def can_extents(self, next: Context, h: Handle) -> bool:
        return bool(h.can_extents())

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        return FuaMode(h.can_fua())

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        return bool(h.can_multi_conn())

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        return CacheMode(h.can_cache())

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        data: bytes | memoryview = h.pread(count, offset, flags)
        return data

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        h.pwrite(buf, offset, flags)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        h.flush(flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        h.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        h.zero(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        h.cache(count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        got: list[tuple[int, int, int]] = h.extents(count, offset, flags)
        return got
