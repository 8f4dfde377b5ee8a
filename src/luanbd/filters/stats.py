"""nbdkit-stats-filter(1), as nbdkit 1.32's: counts, bytes and time of each kind of request,
written to ``statsfile=FILE`` (truncated, or appended to with ``statsappend=true``) when the
server exits, with the request size and alignment histogram down to ``statsthreshold=``
percent of the requests (default 95; 0: none).

The histogram keeps nbdkit's quirks: the size buckets are listed by their request count, and
of two buckets with the same count only one is shown (here the first one seen; nbdkit's
depends on its hash table); "other sizes" says all the bytes of the kind of request."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import IO

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import FuaMode, Handle, StartupError
from luanbd.backend.password import parse_int
from luanbd.filters.emulate import fua_above, with_fua, zero_or_emulate
from luanbd.filters.params import bool_parameter

KiB = 1024
MiB = KiB * KiB
GiB = MiB * KiB


def humansize(n: float) -> str:
    if n < KiB:
        return f"{int(n)} bytes"
    if n < MiB:
        return f"{n / KiB:.2f} KiB"
    if n < GiB:
        return f"{n / MiB:.2f} MiB"
    return f"{n / GiB:.2f} GiB"


def humanrate(n: int, usecs: int) -> str:
    secs = usecs / 1000000.0
    return humansize(n / secs) if secs != 0.0 else "(n/a)"




def _alignment(offset: int) -> int:
    """Trailing zero bits of offset; -1 for 0 (any alignment)."""
    if offset == 0:
        return -1
    return (offset & -offset).bit_length() - 1


class _Stat:
    __slots__ = ("bytes", "count", "name", "ops", "size", "usecs")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ops = 0
        self.bytes = 0
        self.usecs = 0
        #: size bits -> alignment bits -> requests (dicts keep the order first seen).
        self.count: dict[int, dict[int, int]] = {}
        self.size: dict[int, int] = {}


class _Conn:
    __slots__ = ("fua",)

    def __init__(self) -> None:
        #: The next layer's can_fua, once asked.
        self.fua = FuaMode.NATIVE


class Filter(Backend):
    name = "stats"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = ("statsfile=<FILE>    (required) The file to place the log in.\n"
                   "statsappend=<BOOL>  True to append to the log (default false).")

    def __init__(self) -> None:
        self.filename: str | None = None
        self.append = False
        self.threshold = 0.95
        self.file: IO[str] | None = None
        self.start = 0.0
        self.lock = threading.Lock()
        self.stats = {k: _Stat(k) for k in
                      ("read", "write", "trim", "zero", "extents", "cache", "flush")}

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "statsfile":
            self.filename = os.path.abspath(value)
        elif key == "statsappend":
            self.append = bool_parameter(value)
        elif key == "statsthreshold":
            ival = parse_int("printing threshold", value)
            if not 0 <= ival <= 100:
                raise StartupError("statsthreshold must be between 0 and 100 (percent)")
            self.threshold = ival / 100
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        if self.filename is None:
            raise StartupError("stats filter requires statsfile parameter")
        next()

    def get_ready(self) -> None:
        assert self.filename is not None
        try:
            self.file = open(self.filename, "a" if self.append else "w",  # noqa: SIM115
                             encoding="utf-8")
        except OSError as e:
            raise StartupError(f"open: {self.filename}: {e.strerror}") from None
        self.start = time.time()

    # --- the report -----------------------------------------------------------------------
    def unload(self) -> None:
        if self.file is None:
            return
        usecs = int((time.time() - self.start) * 1e6)
        if usecs > 0:
            with self.lock:
                self.file.write(self.report(usecs))
        self.file.close()
        self.file = None

    def report(self, usecs: int) -> str:
        s = self.stats
        ops = sum(s[k].ops for k in ("read", "write", "trim", "zero", "extents", "flush"))
        nbytes = sum(s[k].bytes for k in ("read", "write", "trim", "zero"))
        out = [f"total: {ops} ops, {usecs / 1e6:.6f} s, {humansize(nbytes)}, "
               f"{humanrate(nbytes, usecs)}/s\n"]
        for st in s.values():
            if st.ops == 0:
                continue
            out.append(f"{st.name}: {st.ops} ops, {st.usecs / 1e6:.6f} s, "
                       f"{humansize(st.bytes)}, {humanrate(st.bytes, st.usecs)}/s op, "
                       f"{humanrate(st.bytes, usecs)}/s total\n")
            if self.threshold != 0 and st.count:
                out.append("  Request size and alignment breakdown:\n")
                out += self._histogram(st)
                out.append("\n")
        return "".join(out)

    def _histogram(self, st: _Stat) -> list[str]:
        by_count: dict[int, int] = {}
        total = 0.0
        for bits, aligns in st.count.items():
            requests = sum(aligns.values())
            by_count.setdefault(requests, bits)  # nbdkit keeps one bucket per count
            total += requests
        out = []
        to_print = int(self.threshold * total)
        printed = 0
        for requests in sorted(by_count, reverse=True):
            if printed >= to_print:
                rest = st.ops - printed
                out.append(f"    other sizes: {rest / total * 100:4.1f}% ({rest} reqs, "
                           f"{humansize(st.bytes)} total)\n")
                break
            bits = by_count[requests]
            out.append(f"    {bits:2d} bits: {requests / total * 100:4.1f}% ({requests} reqs, "
                       f"{humansize(st.size[bits])} total)\n")
            printed += requests
            out += self._alignments(st.count[bits])
        return out

    def _alignments(self, aligns: dict[int, int]) -> list[str]:
        any_align = aligns.get(-1, 0)
        total = sum(aligns.values())
        hist = {b: n for b, n in sorted(aligns.items()) if b != -1}
        fixed = {}
        for bits, n in hist.items():
            fixed[bits] = n + any_align + sum(m for b, m in hist.items() if b > bits)
        out = []
        cutoff = int((1 - self.threshold) * total)
        keys = sorted(fixed)
        for i, bits in enumerate(keys):
            requests = fixed[bits]
            if requests < cutoff:
                out.append(f"         {bits:2d}+ bit-aligned: {requests / total * 100:4.1f}% "
                           f"({requests})\n")
                break
            if i + 1 == len(keys) or fixed[keys[i + 1]] != requests:
                out.append(f"         {bits:2d} bit aligned: {requests * 100 / total:5.1f}% "
                           f"({requests})\n")
        return out

    # --- the requests ---------------------------------------------------------------------
    # FUA and zeroes the plugin cannot do are emulated below this layer, as in nbdkit, so
    # that the emulation's flushes and writes are not counted (filters/emulate.py).
    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        return _Conn()

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        h.fua = next.can_fua()
        return fua_above(h.fua)

    def _record(self, st: _Stat, size: int, offset: int, start: float) -> None:
        usecs = int((time.time() - start) * 1e6)
        with self.lock:
            st.ops += 1
            st.bytes += size
            st.usecs += usecs
            if self.threshold == 0 or size == 0:
                return
            bits = size.bit_length() - 1
            aligns = st.count.setdefault(bits, {})
            align = _alignment(offset)
            aligns[align] = aligns.get(align, 0) + 1
            st.size[bits] = st.size.get(bits, 0) + size

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        start = time.time()
        data = next.pread(count, offset, flags)
        self._record(self.stats["read"], count, offset, start)
        return data

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        start = time.time()
        with_fua(next, h.fua, flags, lambda f: next.pwrite(buf, offset, f))
        self._record(self.stats["write"], len(buf), offset, start)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        start = time.time()
        with_fua(next, h.fua, flags, lambda f: next.trim(count, offset, f))
        self._record(self.stats["trim"], count, offset, start)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        start = time.time()
        with_fua(next, h.fua, flags, lambda f: zero_or_emulate(next, count, offset, f))
        self._record(self.stats["zero"], count, offset, start)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        start = time.time()
        next.cache(count, offset, flags)
        self._record(self.stats["cache"], count, offset, start)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        start = time.time()
        next.flush(flags)
        self._record(self.stats["flush"], 0, 0, start)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        start = time.time()
        result = next.extents(count, offset, flags)
        self._record(self.stats["extents"], count, offset, start)
        return result
