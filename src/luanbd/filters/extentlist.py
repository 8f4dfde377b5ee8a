"""nbdkit-extentlist-filter(1): a static list of extents over the plugin.

``extentlist=FILE`` (required, once) holds one extent a line: ``offset length [type]``,
fields separated by spaces or tabs; offset and length in nbdkit_parse_size's format, type
an integer, missing (0: data) or words containing ``hole`` and/or ``zero``.  Zero-length
extents are skipped, the rest must not overlap; gaps (before, between, after) are holes that
read as zeroes.  The file is read when the server is getting ready; every error (a line that
cannot be parsed, overlaps, a file that cannot be opened) stops the server, as nbdkit.
The list is only what extents requests answer: writes do not change it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import EXTENT_HOLE, EXTENT_ZERO, Handle, StartupError
from luanbd.filters.params import size_parameter

HOLE = EXTENT_HOLE | EXTENT_ZERO
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
#: A token and what follows it, as strtok_r(3) with the delimiters " \t" finds them.
_TOKEN = re.compile(r"[ \t]*([^ \t]+)")
#: What sscanf(3)'s %u takes at the start of a field.
_C_UNSIGNED = re.compile(r"\s*([+-]?)(\d+)")


def _type(field: str) -> int:
    """The type field: sscanf("%u") if it starts as a number, else the words."""
    m = _C_UNSIGNED.match(field)
    if m:
        n = min(int(m.group(2)), UINT32_MAX)  # (an out-of-range value saturates)
        return (-n if m.group(1) == "-" else n) & UINT32_MAX
    return (EXTENT_HOLE if "hole" in field else 0) | (EXTENT_ZERO if "zero" in field else 0)


def parse_line(path: str, line: str) -> tuple[int, int, int]:
    """(offset, length, type) of one line; StartupError with nbdkit's message."""
    tokens = list(_TOKEN.finditer(line))
    if len(tokens) < 2:
        # strtok_r has cut the line after its first token when nbdkit prints it.
        shown = line[:tokens[0].end()] if tokens else line
        raise StartupError(f"{path}: cannot parse {shown}")
    offset = size_parameter("offset", tokens[0].group(1))
    length = size_parameter("length", tokens[1].group(1))
    kind = _type(tokens[2].group(1)) if len(tokens) > 2 else 0
    return offset, length, kind


def parse_extentlist(path: str) -> list[tuple[int, int, int]]:
    """The file's extents, sorted, with holes filling every gap up to 2^64."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError as err:
        raise StartupError(f"open: {path}: {err.strerror}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    extents = []
    for line in lines:
        offset, length, kind = parse_line(path, line)
        if length:
            extents.append((offset, length, kind))
    extents.sort(key=lambda e: e[0])
    end = 0
    for offset, length, _ in extents:
        if offset < end:
            raise StartupError("extents in the extent list are overlapping")
        end = offset + length
    full: list[tuple[int, int, int]] = []
    end = 0
    for offset, length, kind in extents:
        if offset > end:
            full.append((end, offset - end, HOLE))
        full.append((offset, length, kind))
        end = offset + length
    if end < UINT64_MAX:
        full.append((end, UINT64_MAX - end, HOLE))
    for i, (offset, length, kind) in enumerate(full):
        log.debug(f"extentlist: extent[{i}] = {offset}-{offset + length - 1} "
                  f"(length {length}) type {kind}")
    return full


class Filter(Backend):
    name = "extentlist"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = "extentlist=<FILENAME> (required) The file containing the extent list."

    def __init__(self) -> None:
        self.path: str | None = None
        self.table: list[tuple[int, int, int]] = []
        self.starts: list[int] = []

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "extentlist":
            if self.path is not None:
                raise StartupError("extentlist cannot appear twice")
            self.path = value
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        if self.path is None:
            raise StartupError("you must supply the extentlist parameter on the command line")
        next()

    def get_ready(self) -> None:
        assert self.path is not None
        self.table = parse_extentlist(self.path)
        self.starts = [e[0] for e in self.table]

    def can_extents(self, next: Context, h: Handle) -> bool:
        return True

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        i = bisect.bisect_right(self.starts, offset) - 1
        out = []
        end = offset + count
        while offset < end and i < len(self.table):
            start, length, kind = self.table[i]
            out.append((offset, start + length - offset, kind))
            offset = start + length
            i += 1
        return out
