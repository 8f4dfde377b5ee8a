"""nbdkit-ddrescue-filter(1): serve a disk image rescued by GNU ddrescue, read-only, failing
reads of what its mapfile does not mark as rescued.

``ddrescue-mapfile=FILE`` is read when it is given.  Lines starting with ``#`` are comments;
the first other non-empty line is ddrescue's status line and is skipped; every later line
``pos size status`` (C integers: decimal, 0x hex or 0 octal, as ddrescue writes them) is a
block, and only blocks with status ``+`` (finished) are kept.  A read is served if it lies
entirely within one finished block, otherwise it fails with EIO (and no error message, as
nbdkit's).  Lines that do not parse are skipped, as nbdkit's sscanf skips them.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import re
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import CacheMode, Handle, LoggedError, StartupError

#: sscanf(3)'s "%li\t%li\t%c": two C integers and a character, whitespace between.
_BLOCK = re.compile(r"\s*([+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*))"
                    r"\s*([+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*))\s*(.)", re.S)
INT64_MAX = (1 << 63) - 1


def _c_long(text: str) -> int:
    """strtol(3) with base 0, saturating as it does."""
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" and len(digits) > 1 else 10
    value = sign * int(digits, base)
    return max(-INT64_MAX - 1, min(INT64_MAX, value))


def parse_mapfile(path: str) -> list[tuple[int, int]]:
    """The finished blocks of the mapfile, as (first byte, last byte)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError as err:
        raise StartupError(f"{path}: ddrescue: fopen: {err.strerror}") from None
    ranges = []
    status_seen = False
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for line in lines:
        if line.startswith("#"):
            continue
        if line and not status_seen:
            status_seen = True
            log.debug(f"{path}: skipping status line: '{line}'")
            continue
        m = _BLOCK.match(line)
        if m is None:
            continue
        offset, length, status = _c_long(m.group(1)), _c_long(m.group(2)), m.group(3)
        if offset < 0:
            raise StartupError("block offset must not be negative")
        if length < 0:
            raise StartupError("block length must not be negative")
        if status == "+":
            ranges.append((offset, offset + length - 1))
        log.debug(f"{path}: range: {offset:#x} {length:#x} '{status}'")
    return ranges


class Filter(Backend):
    name = "ddrescue"
    config_help = "ddrescue-mapfile=...     Specify ddrescue mapfile to use"

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        #: The finished blocks' first bytes, sorted, and for each the furthest last byte of
        #: the blocks up to it: a read is within one block iff a block starting at or
        #: before it ends at or after its end.
        self.starts: list[int] = []
        self.reach: list[int] = []

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "ddrescue-mapfile":
            self.ranges += parse_mapfile(value)
            self.ranges.sort()
            self.starts = [start for start, _ in self.ranges]
            self.reach = list(itertools.accumulate((end for _, end in self.ranges), max))
        else:
            next(key, value)

    def can_write(self, next: Context, h: Handle) -> bool:
        return False

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        return CacheMode.NONE

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and self.reach[i] >= offset + count - 1:
            return next.pread(count, offset, flags)
        log.debug(f"ddrescue: pread: range: {offset:#x} {count:#x} failing with EIO")
        raise LoggedError("pread", "not in a finished block of the mapfile", errno.EIO,
                          bare=True)
