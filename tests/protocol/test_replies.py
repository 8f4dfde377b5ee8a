"""Reply encoders against the byte layouts of proto.md "Simple reply message", "Structured
reply chunk message" and "Structured reply types"."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from luanbd.protocol.constants import NbdError
from luanbd.protocol.replies import (
    block_status_reply,
    error_chunk_reply,
    read_chunk_reply,
    simple_reply,
)

from . import vectors as v

DONE = v.SPEC_REPLY_FLAGS["NBD_REPLY_FLAG_DONE"]
TYPE_OFFSET_DATA = v.SPEC_REPLY_TYPES["NBD_REPLY_TYPE_OFFSET_DATA"]
TYPE_BLOCK_STATUS = v.SPEC_REPLY_TYPES["NBD_REPLY_TYPE_BLOCK_STATUS"]
TYPE_ERROR = v.SPEC_REPLY_TYPES["NBD_REPLY_TYPE_ERROR"]
COOKIE = 0x0102030405060708


def _join(buffers: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def _chunk(data: bytes) -> tuple[int, int, int, bytes]:
    """Decode exactly one structured chunk: (flags, type, handle, payload)."""
    magic, flags, kind, handle, length = struct.unpack_from(">IHHQI", data)
    assert magic == v.STRUCTURED_REPLY_MAGIC
    assert len(data) == 20 + length, "the length field covers exactly the payload"
    return flags, kind, handle, data[20:]


# --- simple replies -----------------------------------------------------------------------
def test_simple_reply_ok() -> None:
    # S: 32 bits 0x67446698, S: 32 bits error, S: 64 bits handle
    assert _join(simple_reply(COOKIE)) == bytes.fromhex("67446698" "00000000"
                                                        "0102030405060708")


def test_simple_reply_error() -> None:
    data = _join(simple_reply(COOKIE, NbdError.NOSPC))
    assert data == bytes.fromhex("67446698" "0000001c" "0102030405060708")


def test_simple_reply_read_data_follows_header() -> None:
    """(*length* bytes of data if the request is of type NBD_CMD_READ and *error* is zero)"""
    payload = b"\x00\x01\x02\xff" * 128
    data = _join(simple_reply(2**64 - 1, data=memoryview(payload)))
    assert data[:16] == bytes.fromhex("67446698" "00000000" "ffffffffffffffff")
    assert data[16:] == payload


# --- NBD_REPLY_TYPE_OFFSET_DATA -----------------------------------------------------------
def test_read_chunk_layout() -> None:
    data = _join(read_chunk_reply(COOKIE, 0x1122334455667788, b"abc"))
    assert data == bytes.fromhex(
        "668e33ef"  # magic
        "0001"  # flags: NBD_REPLY_FLAG_DONE
        "0001"  # type: NBD_REPLY_TYPE_OFFSET_DATA
        "0102030405060708"  # handle
        "0000000b"  # length = 8 + 3
        "1122334455667788"  # offset
    ) + b"abc"


@settings(max_examples=50, deadline=None)
@given(cookie=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**64 - 1),
       payload=st.binary(min_size=1, max_size=600))
def test_read_chunk_roundtrip(cookie: int, offset: int, payload: bytes) -> None:
    """*length* MUST be at least 9 ... 64 bits: offset, *length - 8* bytes: data."""
    flags, kind, handle, body = _chunk(_join(read_chunk_reply(cookie, offset, payload)))
    assert (flags, kind, handle) == (DONE, TYPE_OFFSET_DATA, cookie)
    assert len(body) >= 9
    assert struct.unpack_from(">Q", body) == (offset,)
    assert body[8:] == payload


# --- NBD_REPLY_TYPE_ERROR -----------------------------------------------------------------
def test_error_chunk_without_message() -> None:
    """nbdkit.md §4: Errors with SR = NBD_REPLY_TYPE_ERROR (0x8001), with no message text."""
    data = _join(error_chunk_reply(COOKIE, NbdError.INVAL))
    assert data == bytes.fromhex(
        "668e33ef" "0001" "8001" "0102030405060708"
        "00000006"  # length: *length* MUST be at least 6
        "00000016"  # error: EINVAL (22)
        "0000"  # message length
    )


def test_error_chunk_with_message() -> None:
    msg = b"offset and count are out of range"
    flags, kind, handle, body = _chunk(_join(error_chunk_reply(7, NbdError.IO, msg)))
    assert (flags, kind, handle) == (DONE, TYPE_ERROR, 7)
    error, length = struct.unpack_from(">IH", body)
    assert error == v.SPEC_ERRORS["NBD_EIO"]
    assert length == len(msg) <= len(body) - 6  # "no more than header *length* - 6"
    assert body[6:] == msg


def test_error_chunk_is_an_error_chunk_type() -> None:
    """All error chunk types have bit 15 set."""
    _, kind, _, _ = _chunk(_join(error_chunk_reply(0, NbdError.SHUTDOWN)))
    assert kind & (1 << 15)


# --- NBD_REPLY_TYPE_BLOCK_STATUS ----------------------------------------------------------
def test_block_status_layout() -> None:
    hole_zero = v.SPEC_STATE_FLAGS["NBD_STATE_HOLE"] | v.SPEC_STATE_FLAGS["NBD_STATE_ZERO"]
    data = _join(block_status_reply(COOKIE, 1, [(4096, 0), (8192, hole_zero)]))
    assert data == bytes.fromhex(
        "668e33ef" "0001" "0005" "0102030405060708"
        "00000014"  # length = 4 + 2 * 8
        "00000001"  # metadata context id
        "00001000" "00000000"  # 4096 bytes, allocated
        "00002000" "00000003"  # 8192 bytes, HOLE | ZERO
    )


@settings(max_examples=50, deadline=None)
@given(cookie=st.integers(0, 2**64 - 1), context=st.integers(0, 2**32 - 1),
       extents=st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 3)), min_size=1,
                        max_size=20))
def test_block_status_roundtrip(cookie: int, context: int,
                                extents: list[tuple[int, int]]) -> None:
    """*length* MUST be 4 + (a positive integer multiple of 8) ... 32 bits, metadata context
    ID, followed by a list of one or more descriptors (32 bits length, 32 bits flags)."""
    flags, kind, handle, body = _chunk(_join(block_status_reply(cookie, context, extents)))
    assert (flags, kind, handle) == (DONE, TYPE_BLOCK_STATUS, cookie)
    assert (len(body) - 4) % 8 == 0
    assert len(body) > 4
    assert struct.unpack_from(">I", body) == (context,)
    got = [struct.unpack_from(">II", body, 4 + 8 * i) for i in range((len(body) - 4) // 8)]
    assert got == extents


def test_block_status_accepts_a_generator() -> None:
    data = _join(block_status_reply(1, 1, ((n, 0) for n in (512, 1024))))
    _, _, _, body = _chunk(data)
    assert len(body) == 4 + 16
