"""--metrics in the Python request loop: the request's time and the backend's share of it.

Only a connection of a server started with --metrics goes through these wrappers; without
it the request path is the same code as before, with nothing added.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

from luanbd.backend.context import BackendContext
from luanbd.protocol.constants import Cmd
from luanbd.protocol.replies import Buffers
from luanbd.protocol.transmission import Request
from luanbd.server import stats

_READ, _WRITE = Cmd.READ, Cmd.WRITE
_STRIDE, _PLUGIN_NS = stats.STRIDE, stats.PLUGIN_NS


def metered(handle: Callable[[Request], Buffers],
            cells: array[int]) -> Callable[[Request], Buffers]:
    """``handle`` that records each request (count, payload bytes, latency) in ``cells``."""
    record = stats.record

    def handle_metered(req: Request) -> Buffers:
        start = perf_counter_ns()
        try:
            return handle(req)
        finally:
            cmd = req.cmd
            record(cells, cmd, req.length if cmd is _READ or cmd is _WRITE else 0,
                   perf_counter_ns() - start)

    return handle_metered


class MeteredContext:
    """A BackendContext whose data calls add their time to the command's PLUGIN_NS cell.
    What is not a request's call (top, caps, size ...) is the wrapped context's."""

    def __init__(self, ctx: BackendContext, cells: array[int]) -> None:
        self._ctx = ctx
        self._cells = cells

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def _add(self, cmd: Cmd, start: int) -> None:
        self._cells[cmd * _STRIDE + _PLUGIN_NS] += perf_counter_ns() - start

    def pread(self, count: int, offset: int) -> bytes | memoryview:
        start = perf_counter_ns()
        try:
            return self._ctx.pread(count, offset)
        finally:
            self._add(Cmd.READ, start)

    def pwrite(self, buf: bytes, offset: int, fua: bool) -> None:
        start = perf_counter_ns()
        try:
            self._ctx.pwrite(buf, offset, fua)
        finally:
            self._add(Cmd.WRITE, start)

    def flush(self) -> None:
        start = perf_counter_ns()
        try:
            self._ctx.flush()
        finally:
            self._add(Cmd.FLUSH, start)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        start = perf_counter_ns()
        try:
            self._ctx.trim(count, offset, fua)
        finally:
            self._add(Cmd.TRIM, start)

    def zero(self, count: int, offset: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        start = perf_counter_ns()
        try:
            self._ctx.zero(count, offset, may_trim=may_trim, fua=fua, fast=fast)
        finally:
            self._add(Cmd.WRITE_ZEROES, start)

    def cache(self, count: int, offset: int) -> None:
        start = perf_counter_ns()
        try:
            self._ctx.cache(count, offset)
        finally:
            self._add(Cmd.CACHE, start)

    def extents(self, count: int, offset: int, req_one: bool,
                wide: bool = False) -> list[tuple[int, int]]:
        start = perf_counter_ns()
        try:
            return self._ctx.extents(count, offset, req_one, wide=wide)
        finally:
            self._add(Cmd.BLOCK_STATUS, start)

    def meta_extents(self, context: bytes, count: int, offset: int, req_one: bool,
                     wide: bool = False) -> list[tuple[int, int]]:
        start = perf_counter_ns()
        try:
            return self._ctx.meta_extents(context, count, offset, req_one, wide=wide)
        finally:
            self._add(Cmd.BLOCK_STATUS, start)
