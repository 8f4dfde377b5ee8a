"""nbdkit-protect-filter(1): ``protect=START-END`` (inclusive, repeatable; ``~START-END``
protects all but the range; an omitted START/END is the start/end of the disk) makes writes,
trims and zeroes into the ranges fail with EPERM unless they leave the data as it is (the
plugin is read to compare)."""

from __future__ import annotations

import errno
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError, StartupError
from luanbd.filters.params import UINT64_MAX, parse_number

_INT64_MAX = (1 << 63) - 1


def parse_uint64(what: str, value: str) -> int:
    """nbdkit_parse_uint64_t, with nbdkit's messages."""
    return parse_number(what, value, UINT64_MAX)


class Filter(Backend):
    name = "protect"
    config_help = "protect=<START>-<END>      Protect range of bytes START-END (inclusive)."

    def __init__(self) -> None:
        #: (start, end inclusive, the parameter as given), as parsed.
        self.ranges: list[tuple[int, int, str]] = []
        #: The protected ranges once merged, ascending: (start, end inclusive, description).
        self.protected: list[tuple[int, int, str]] = []

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "protect":
            self._parse(value)
        else:
            next(key, value)

    def _parse(self, description: str) -> None:
        value, negate = description, description.startswith("~")
        if negate:
            value = value[1:]
        if "-" not in value:
            raise StartupError(f"cannot parse range, missing '-': {description}")
        start_str, end_str = value.split("-", 1)
        start = parse_uint64("range", start_str) if start_str else 0
        end = parse_uint64("range", end_str) if end_str else _INT64_MAX
        if end < start:
            raise StartupError(f"invalid range, end < start: {description}")
        if not negate:
            self.ranges.append((start, end, description))
        else:
            if start > 0:
                self.ranges.append((0, start - 1, description))
            if end < _INT64_MAX:
                self.ranges.append((end + 1, _INT64_MAX, description))

    def config_complete(self, next: Callable[[], None]) -> None:
        # Sorted by start (stable, as nbdkit's qsort is not guaranteed to be: ties keep the
        # order given), then adjacent and overlapping ones merged as nbdkit does (the end
        # becomes the later range's end).
        ranges = sorted(self.ranges, key=lambda r: r[0])
        i = 0
        while i < len(ranges) - 1:
            (s, e, d), (s2, e2, _) = ranges[i], ranges[i + 1]
            if e + 1 >= s2:
                ranges[i] = (s, e2, d)
                del ranges[i + 1]
                continue
            i += 1
        self.protected = ranges
        next()

    def _check(self, fn: str, next: Context, count: int, offset: int,
               buf: bytes | memoryview | None) -> None:
        end = offset + count
        for start, last, description in self.protected:
            lo, hi = max(start, offset), min(last + 1, end)
            if lo >= hi:
                continue
            expected = bytes(next.pread(hi - lo, lo, 0))
            if buf is None:
                matches = not expected.strip(b"\0")
            else:
                matches = expected == bytes(memoryview(buf)[lo - offset:hi - offset])
            if not matches:
                raise PluginError(fn, "protect filter prevented write to protected range "
                                      f"{description}", errno.EPERM, bare=True)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._check("pwrite", next, len(buf), offset, buf)
        next.pwrite(buf, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check("trim", next, count, offset, None)
        next.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check("zero", next, count, offset, None)
        next.zero(count, offset, flags)
