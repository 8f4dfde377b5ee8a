"""Reply encoders for the transmission phase: simple, structured and extended (proto.md
"Replies").  Once extended headers are negotiated every reply is an extended reply chunk
(``ext_*``): no simple replies, and block status uses NBD_REPLY_TYPE_BLOCK_STATUS_EXT.

Each returns a list of buffers so that large READ payloads are sent without being copied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from luanbd.protocol.constants import (
    EXTENDED_REPLY_HEADER,
    EXTENDED_REPLY_MAGIC,
    OFFSET_DATA_PREFIX,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_HEADER,
    STRUCTURED_REPLY_MAGIC,
    NbdError,
    ReplyFlag,
    ReplyType,
)

Buffers = list[bytes | memoryview]

_ERROR_PAYLOAD = struct.Struct(">IH")
_U32 = struct.Struct(">I")
_DESCRIPTOR = struct.Struct(">II")
_EXT_STATUS_PREFIX = struct.Struct(">II")  # context id, descriptor count
_EXT_DESCRIPTOR = struct.Struct(">QQ")  # length, status


def simple_reply(cookie: int, error: NbdError = NbdError.OK,
                 data: bytes | memoryview | None = None) -> Buffers:
    """A simple reply; ``data`` follows it for a successful READ."""
    header = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
    return [header] if data is None else [header, data]


#: The structured reply header and the OFFSET_DATA chunk's offset, in one pack (hot path).
_READ_CHUNK = struct.Struct(STRUCTURED_REPLY_HEADER.format + OFFSET_DATA_PREFIX.format[1:])
_PREFIX = OFFSET_DATA_PREFIX.size
_MAGIC, _DONE, _OFFSET_DATA = (int(v) for v in (
    STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.OFFSET_DATA))


def read_chunk_reply(cookie: int, offset: int, data: bytes | memoryview) -> Buffers:
    """A successful READ as one NBD_REPLY_TYPE_OFFSET_DATA chunk with the DONE flag."""
    return [_READ_CHUNK.pack(_MAGIC, _DONE, _OFFSET_DATA, cookie, _PREFIX + len(data), offset),
            data]


def error_chunk_reply(cookie: int, error: NbdError, message: bytes = b"") -> Buffers:
    """A final NBD_REPLY_TYPE_ERROR chunk."""
    header = STRUCTURED_REPLY_HEADER.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE,
                                          ReplyType.ERROR, cookie, 6 + len(message))
    return [header + _ERROR_PAYLOAD.pack(error, len(message)) + message]


def block_status_reply(cookie: int, context_id: int,
                       extents: Iterable[tuple[int, int]], done: bool = True) -> Buffers:
    """An NBD_REPLY_TYPE_BLOCK_STATUS chunk of (length, flags) descriptors, final unless
    ``done`` is False (one chunk per selected metadata context)."""
    body = b"".join(_DESCRIPTOR.pack(length, flags) for length, flags in extents)
    header = STRUCTURED_REPLY_HEADER.pack(STRUCTURED_REPLY_MAGIC, _DONE if done else 0,
                                          ReplyType.BLOCK_STATUS, cookie, 4 + len(body))
    return [header + _U32.pack(context_id) + body]


# --- Extended headers: every reply is a 32-byte extended reply header + payload --------------
def ext_reply(cookie: int, offset: int, reply_type: ReplyType = ReplyType.NONE,
              length: int = 0, flags: ReplyFlag = ReplyFlag.DONE) -> bytes:
    """An extended reply header; ``offset`` echoes the request's offset.  The default is
    the final NBD_REPLY_TYPE_NONE chunk that answers a request needing no payload."""
    return EXTENDED_REPLY_HEADER.pack(EXTENDED_REPLY_MAGIC, flags, reply_type, cookie,
                                      offset, length)


def ext_read_reply(cookie: int, offset: int, data: bytes | memoryview) -> Buffers:
    """A successful READ: one final NBD_REPLY_TYPE_OFFSET_DATA chunk."""
    header = ext_reply(cookie, offset, ReplyType.OFFSET_DATA, _PREFIX + len(data))
    return [header + OFFSET_DATA_PREFIX.pack(offset), data]


def ext_error_reply(cookie: int, offset: int, error: NbdError,
                    message: bytes = b"") -> Buffers:
    """A final NBD_REPLY_TYPE_ERROR chunk (the error reply for every command)."""
    header = ext_reply(cookie, offset, ReplyType.ERROR, 6 + len(message))
    return [header + _ERROR_PAYLOAD.pack(error, len(message)) + message]


def ext_block_status_reply(cookie: int, offset: int, context_id: int,
                           extents: Iterable[tuple[int, int]], done: bool = True) -> Buffers:
    """An NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk of 64-bit (length, status) descriptors,
    final unless ``done`` is False."""
    descriptors = [_EXT_DESCRIPTOR.pack(length, flags) for length, flags in extents]
    body = b"".join(descriptors)
    header = ext_reply(cookie, offset, ReplyType.BLOCK_STATUS_EXT, 8 + len(body),
                       ReplyFlag.DONE if done else ReplyFlag(0))
    return [header + _EXT_STATUS_PREFIX.pack(context_id, len(descriptors)) + body]


# --- Sparse READ replies: OFFSET_DATA and OFFSET_HOLE chunks, the last one final ------------
_HOLE = struct.Struct(">QI")  # offset, hole size


def data_chunk_reply(cookie: int, offset: int, data: bytes | memoryview,
                     done: bool) -> Buffers:
    """An NBD_REPLY_TYPE_OFFSET_DATA chunk of a READ answered in several chunks."""
    return [_READ_CHUNK.pack(_MAGIC, _DONE if done else 0, _OFFSET_DATA, cookie,
                             _PREFIX + len(data), offset), data]


def hole_chunk_reply(cookie: int, offset: int, length: int, done: bool) -> Buffers:
    """An NBD_REPLY_TYPE_OFFSET_HOLE chunk: ``length`` bytes of zeroes at ``offset``."""
    return [STRUCTURED_REPLY_HEADER.pack(_MAGIC, _DONE if done else 0, ReplyType.OFFSET_HOLE,
                                         cookie, _HOLE.size) + _HOLE.pack(offset, length)]


def ext_data_chunk_reply(cookie: int, req_offset: int, offset: int,
                         data: bytes | memoryview, done: bool) -> Buffers:
    flags = ReplyFlag.DONE if done else ReplyFlag(0)
    header = ext_reply(cookie, req_offset, ReplyType.OFFSET_DATA, _PREFIX + len(data), flags)
    return [header + OFFSET_DATA_PREFIX.pack(offset), data]


def ext_hole_chunk_reply(cookie: int, req_offset: int, offset: int, length: int,
                         done: bool) -> Buffers:
    flags = ReplyFlag.DONE if done else ReplyFlag(0)
    return [ext_reply(cookie, req_offset, ReplyType.OFFSET_HOLE, _HOLE.size, flags)
            + _HOLE.pack(offset, length)]
