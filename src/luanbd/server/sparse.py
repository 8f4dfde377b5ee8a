"""READs answered with NBD_REPLY_TYPE_OFFSET_HOLE for zero ranges (``--sparse-reads``).

With structured replies, a READ without NBD_CMD_FLAG_DF may be answered in chunks: the
ranges base:allocation reports as reading zeroes go as OFFSET_HOLE chunks (12 bytes each
instead of the zeroes), only the rest is read from the plugin and sent as OFFSET_DATA.  It
costs an extents call per READ, so it is opt-in: worth it where extents are cheap and disks
sparse, for clients that read holes (qemu's and the kernel's block layers, nbdcopy
--no-extents, a dd).
"""

from __future__ import annotations

from luanbd import log
from luanbd.backend.context import BackendContext
from luanbd.backend.interface import PluginError
from luanbd.protocol.constants import BlockStatusFlag

#: Zero ranges shorter than this are read and sent as data: a chunk header (20 or 32 bytes)
#: and a plugin call more cost more than they save.
MIN_HOLE = 4096
_ZERO = int(BlockStatusFlag.ZERO)

#: (offset, length, data or None for a hole), in order, covering the request.
Pieces = list[tuple[int, int, bytes | memoryview | None]]


def sparse_read(ctx: BackendContext, count: int, offset: int) -> Pieces:
    """The READ of [offset, offset+count) as data and hole pieces."""
    end = offset + count
    runs: list[list[int]] = []  # [start, length, is_hole]
    try:
        descriptors = ctx.extents(count, offset, False, wide=True)
    except PluginError as err:  # no map: the whole range is read, as without the option
        log.debug(f"--sparse-reads: {err}")
        descriptors = []
    pos = offset
    for length, flags in descriptors:
        if pos >= end:
            break
        n = min(length, end - pos)
        hole = int(bool(flags & _ZERO) and n >= MIN_HOLE)
        if runs and runs[-1][2] == hole:
            runs[-1][1] += n
        else:
            runs.append([pos, n, hole])
        pos += n
    if pos < end:
        if runs and not runs[-1][2]:
            runs[-1][1] += end - pos
        else:
            runs.append([pos, end - pos, 0])
    return [(start, n, None if hole else ctx.pread(n, start)) for start, n, hole in runs]
