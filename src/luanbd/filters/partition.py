"""nbdkit-partition-filter(1): serve partition ``partition=N`` of a disk with an MBR (primary
1-4, logical 5+ in the extended partition's EBR chain) or GPT partition table."""

from __future__ import annotations

import struct
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle, PluginError, StartupError
from luanbd.filters.params import UINT_MAX, parse_number

SECTOR = 512


def parse_unsigned(what: str, value: str) -> int:
    """nbdkit_parse_unsigned, with nbdkit's messages."""
    return parse_number(what, value, UINT_MAX)


def _fail(message: str) -> PluginError:
    return PluginError("open", message, bare=True)


def _is_extended(kind: int) -> bool:
    return kind in (0x05, 0x0F, 0x85)


def _mbr_entry(sector: bytes, i: int) -> tuple[int, int, int]:
    """(type byte, start sector, number of sectors) of entry ``i`` of an MBR or EBR."""
    base = 0x1BE + 16 * i
    start, count = struct.unpack_from("<II", sector, base + 8)
    return sector[base + 4], start, count


def _find_mbr(next: Context, size: int, mbr: bytes, partnum: int) -> tuple[int, int]:
    if partnum <= 4:
        kind, start, count = _mbr_entry(mbr, partnum - 1)
        if count > 0 and kind != 0 and not _is_extended(kind):
            return start * SECTOR, count * SECTOR
        raise _fail(f"MBR partition {partnum} not found")
    for i in range(4):
        kind, ep_start, ep_count = _mbr_entry(mbr, i)
        if ep_count > 0 and _is_extended(kind):
            break
    else:
        raise _fail("MBR logical partition selected, "
                    "but there is no extended partition in the partition table")
    ebr = ep_start * SECTOR
    i = 5
    while True:
        if ebr % SECTOR or ebr < SECTOR or ebr >= size - SECTOR:
            raise _fail("invalid EBR chain: "
                        "next EBR boot sector is located outside disk boundary")
        sector = bytes(next.pread(SECTOR, ebr, 0))
        if partnum == i:
            _, start, count = _mbr_entry(sector, 0)
            offset, length = ebr + start * SECTOR, count * SECTOR
            if offset <= ebr or offset + length > (ep_start + ep_count) * SECTOR:
                raise _fail(f"logical partition start or size out of range (offset={offset}, "
                            f"range={length}, ep:startsect={ep_start}, "
                            f"ep:nrsects={ep_count})")
            return offset, length
        _, start, count = _mbr_entry(sector, 1)
        if start == 0 and count == 0:
            break
        next_ebr = (ep_start + start) * SECTOR
        if next_ebr <= ebr:
            raise _fail(f"invalid EBR chain: next EBR {next_ebr} <= current EBR {ebr}")
        ebr = next_ebr
        i += 1
    raise _fail(f"MBR partition {partnum} not found")


def _find_gpt(next: Context, size: int, header: bytes, partnum: int) -> tuple[int, int]:
    entries, entry_size = struct.unpack_from("<II", header, 80)
    if partnum > entries:
        raise _fail("GPT partition number out of range")
    if entry_size < 128:
        raise _fail("GPT partition entry size is < 128 bytes")
    if size < 3 * SECTOR + 2 * entries * entry_size:
        raise _fail("GPT partition table is too large for this disk")
    for i in range(entries):
        entry = bytes(next.pread(128, 2 * SECTOR + i * entry_size, 0))
        if partnum == i + 1 and entry[:16] != bytes(16):
            first, last = struct.unpack_from("<QQ", entry, 32)
            return first * SECTOR, (1 + last - first) * SECTOR
    raise _fail(f"GPT partition {partnum} not found")


class _Range:
    __slots__ = ("offset", "range")

    def __init__(self, offset: int, range: int) -> None:
        self.offset = offset
        self.range = range


class Filter(Backend):
    name = "partition"
    config_help = "partition=<PART>    (required) The partition number (counting from 1)."

    def __init__(self) -> None:
        self.partnum = 0

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "partition":
            self.partnum = parse_unsigned("partition", value)
            if self.partnum == 0:
                raise StartupError("invalid partition number")
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        if self.partnum == 0:
            raise StartupError("you must supply the partition parameter on the command line")
        next()

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        # nbdkit's prepare: the partition is found when the connection opens.
        size = next.get_size()
        if size < 2 * SECTOR:
            raise _fail("disk is too small to be a partitioned disk")
        lba01 = bytes(next.pread(2 * SECTOR, 0, 0))
        if size >= 2 * 34 * SECTOR and lba01[SECTOR:SECTOR + 8] == b"EFI PART":
            offset, length = _find_gpt(next, size, lba01[SECTOR:], self.partnum)
        elif lba01[0x1FE:0x200] == b"\x55\xaa":
            offset, length = _find_mbr(next, size, lba01, self.partnum)
        else:
            raise _fail("disk does not contain MBR or GPT partition table signature")
        if offset < 0 or length < 0 or offset + length > size:
            raise _fail("partition is outside the disk")
        return _Range(offset, length)

    def get_size(self, next: Context, h: Handle) -> int:
        size: int = h.range
        return size

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        return next.pread(count, offset + h.offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        next.pwrite(buf, offset + h.offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset + h.offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset + h.offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset + h.offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        shift, end = h.offset, h.range
        out = []
        for start, length, kind in next.extents(count, offset + shift, flags):
            ours = start - shift
            cut = max(0, -ours)
            kept = min(ours + length, end) - ours - cut
            if kept > 0:
                out.append((ours + cut, kept, kind))
        return out
