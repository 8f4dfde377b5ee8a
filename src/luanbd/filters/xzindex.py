"""The xz container's indexes, read from the plugin (for filters/xz.py).

An xz file is one or more streams (each: a 12-byte header, blocks, an index, a 12-byte
footer), with optional stream padding (zero words) between them.  Reading each stream's
footer and index from the end of the file backwards, as xz's ``list.c`` and nbdkit's
``xzfile.c`` do, gives where every block starts in the file and in the uncompressed data,
so one block can be read and decompressed without the others.  The decompression itself is
the standard library's :mod:`lzma` (liblzma), fed the stream's own header and the block.
"""

from __future__ import annotations

import bisect
import lzma
import struct
import zlib
from dataclasses import dataclass

from luanbd import log
from luanbd.backend.chain import Context
from luanbd.backend.interface import PluginError

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
#: Stream header and footer are both this long (LZMA_STREAM_HEADER_SIZE).
STREAM_HEADER_SIZE = 12
#: liblzma's lzma_ret codes, which nbdkit's messages show.
LZMA_FORMAT_ERROR = 7
LZMA_OPTIONS_ERROR = 8
LZMA_DATA_ERROR = 9
#: How much of a block is read from the plugin at a time (nbdkit's bufsize).
READ_SIZE = 1024 * 1024


class XzError(Exception):
    """The file is not a usable xz file: ``str()`` is nbdkit's message."""


@dataclass(frozen=True)
class Block:
    """One non-empty block: where it starts uncompressed and in the file, its sizes, and
    the header of the stream it belongs to (which names its integrity check)."""

    start: int
    size: int
    file_offset: int
    unpadded: int
    stream_header: bytes


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _u32(buf: bytes, at: int) -> int:
    value: int = struct.unpack_from("<I", buf, at)[0]
    return value


def _read(next: Context, count: int, offset: int) -> bytes:
    return bytes(next.pread(count, offset, 0)) if count else b""


def _check_flags(flags: bytes) -> int:
    """The stream flags' check type; LZMA_OPTIONS_ERROR for reserved bits (as liblzma)."""
    if flags[0] != 0 or flags[1] & 0xF0:
        raise XzError(str(LZMA_OPTIONS_ERROR))
    return flags[1] & 0x0F


def _footer(footer: bytes) -> tuple[bytes, int]:
    """lzma_stream_footer_decode: (the flags, backward size); XzError(code)."""
    if footer[10:12] != FOOTER_MAGIC:
        raise XzError(str(LZMA_FORMAT_ERROR))
    if zlib.crc32(footer[4:10]) != _u32(footer, 0):
        raise XzError(str(LZMA_DATA_ERROR))
    _check_flags(footer[8:10])
    return footer[8:10], (_u32(footer, 4) + 1) * 4


def _header(header: bytes) -> bytes:
    """lzma_stream_header_decode: the flags; XzError(code)."""
    if header[:6] != HEADER_MAGIC:
        raise XzError(str(LZMA_FORMAT_ERROR))
    if zlib.crc32(header[6:8]) != _u32(header, 8):
        raise XzError(str(LZMA_DATA_ERROR))
    _check_flags(header[6:8])
    return header[6:8]


def _vli(buf: bytes, at: int) -> tuple[int, int]:
    """One variable-length integer of the index: (value, position after it)."""
    value = shift = 0
    for i in range(9):
        if at >= len(buf):
            break
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i:
                break  # not the shortest encoding
            return value, at
        shift += 7
    raise XzError(str(LZMA_DATA_ERROR))


def parse_index(buf: bytes) -> list[tuple[int, int]]:
    """A stream's index: its records (unpadded size, uncompressed size); XzError(code)."""
    if not buf or buf[0] != 0 or len(buf) < 8 or zlib.crc32(buf[:-4]) != _u32(buf, len(buf) - 4):
        raise XzError(str(LZMA_DATA_ERROR))
    count, at = _vli(buf, 1)
    records = []
    for _ in range(count):
        unpadded, at = _vli(buf, at)
        size, at = _vli(buf, at)
        if unpadded < 5:
            raise XzError(str(LZMA_DATA_ERROR))
        records.append((unpadded, size))
    if _pad4(at) != len(buf) - 4 or any(buf[at:len(buf) - 4]):
        raise XzError(str(LZMA_DATA_ERROR))
    return records


class XzFile:
    """The blocks of the xz file the plugin serves (nbdkit's xzfile_open)."""

    def __init__(self, next: Context) -> None:
        size = next.get_size()
        if size < len(HEADER_MAGIC):
            log.error("xz: file too short")  # then the same message as for other data
            raise XzError("xz: not an xz file")
        if _read(next, len(HEADER_MAGIC), 0) != HEADER_MAGIC:
            raise XzError("xz: not an xz file")
        streams = self._streams(next, size)
        self.blocks: list[Block] = []
        start = 0
        for stream_offset, header, records in streams:
            at = stream_offset + STREAM_HEADER_SIZE
            for unpadded, usize in records:
                if usize:
                    self.blocks.append(Block(start, usize, at, unpadded, header))
                start += usize
                at += _pad4(unpadded)
        self.size = start
        self.starts = [b.start for b in self.blocks]
        self.max_block = max((b.size for b in self.blocks), default=0)

    @staticmethod
    def _streams(next: Context, size: int) -> list[tuple[int, bytes, list[tuple[int, int]]]]:
        """Each stream's (file offset, header bytes, index records), in file order."""
        if size & 3:
            raise XzError("xz: not an xz file: size is not a multiple of 4 bytes")
        streams = []
        pos = size
        while pos > 0:
            if pos < STREAM_HEADER_SIZE:
                raise XzError(f"xz: corrupted file at {pos}")
            footer = _read(next, STREAM_HEADER_SIZE, pos - STREAM_HEADER_SIZE)
            if footer[8:12] == bytes(4):  # stream padding
                pos -= 4
                continue
            pos -= STREAM_HEADER_SIZE
            try:
                flags, index_size = _footer(footer)
            except XzError as err:
                raise XzError(f"xz: invalid stream footer (error {err})") from None
            if pos < index_size + STREAM_HEADER_SIZE:
                raise XzError("xz: invalid stream footer")
            pos -= index_size
            try:
                records = parse_index(_read(next, index_size, pos))
            except XzError as err:
                raise XzError(f"xz: could not parse index (error {err})") from None
            pos -= sum(_pad4(u) for u, _ in records) + STREAM_HEADER_SIZE
            if pos < 0:
                raise XzError(f"xz: could not parse index (error {LZMA_DATA_ERROR})")
            header = _read(next, STREAM_HEADER_SIZE, pos)
            try:
                header_flags = _header(header)
            except XzError as err:
                raise XzError(f"xz: invalid stream header (error {err})") from None
            if header_flags != flags:
                raise XzError("xz: header and footer of stream are not equal "
                              f"(error {LZMA_DATA_ERROR})")
            streams.append((pos, header, records))
        streams.reverse()
        return streams

    def locate(self, offset: int) -> Block:
        """The block holding uncompressed byte ``offset`` (< size)."""
        return self.blocks[bisect.bisect_right(self.starts, offset) - 1]

    def read_block(self, next: Context, block: Block) -> bytes:
        """The uncompressed data of ``block`` (nbdkit's xzfile_read_block), read from the
        plugin a megabyte at a time."""
        if _read(next, 1, block.file_offset) == b"\0":
            raise PluginError("pread", "xz: read: unexpected invalid block in file, "
                              "header[0] = 0", bare=True)
        decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        parts = []
        try:
            parts.append(decoder.decompress(block.stream_header))
            offset, end = block.file_offset, block.file_offset + _pad4(block.unpadded)
            while offset < end:
                n = min(READ_SIZE, end - offset)
                parts.append(decoder.decompress(_read(next, n, offset)))
                offset += n
        except lzma.LZMAError:
            parts = []
        out = b"".join(parts)
        if len(out) != block.size:
            raise PluginError("pread", f"could not parse block data (error {LZMA_DATA_ERROR})",
                              bare=True)
        return out
