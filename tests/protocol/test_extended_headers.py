"""NBD_OPT_EXTENDED_HEADERS, byte by byte from proto.md ("Extended headers").

Wire layouts, written out here rather than taken from luanbd.protocol.constants:

- extended request: u32 0x21e41c71, u16 flags, u16 type, u64 cookie, u64 offset, u64 length
- extended reply chunk: u32 0x6e8a278c, u16 flags, u16 type, u64 cookie, u64 offset,
  u64 payload length; once negotiated every reply is one of these (no simple replies)
- NBD_REPLY_TYPE_BLOCK_STATUS_EXT (6): u32 context id, u32 descriptor count, then
  count x (u64 length, u64 status flags)
- NBD_CMD_FLAG_PAYLOAD_LEN (1 << 5)
"""

from __future__ import annotations

import errno
import struct

import pytest

from luanbd.protocol.constants import Cmd, NbdError, TransmissionFlag
from luanbd.protocol.errors import ProtocolViolation, RequestError
from luanbd.protocol.handshake import (
    NEED_DATA,
    ExportInfo,
    ExportInfoRequested,
    HandshakeConfig,
    ServerHandshake,
)
from luanbd.protocol.replies import (
    ext_block_status_reply,
    ext_error_reply,
    ext_read_reply,
    ext_reply,
)
from luanbd.protocol.transmission import (
    MAX_STATUS_PAYLOAD,
    Request,
    RequestParser,
    Session,
    status_payload_ids,
    validate_request,
)

IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
OPT_GO, OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS = 7, 8, 11
REP_ACK = 1
ERR_UNSUP, ERR_INVALID, ERR_EXT_HEADER_REQD = 2**31 + 1, 2**31 + 3, 2**31 + 10
EXT_REQUEST_MAGIC = 0x21E41C71
EXT_REPLY_MAGIC = 0x6E8A278C
REQUEST_MAGIC = 0x25609513
PAYLOAD_LEN = 1 << 5
FUA = 1 << 0
GIB4 = 1 << 32


def opt(option: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload


def rep(option: int, reply: int) -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, option, reply, 0)


def ext_request(cmd: int, offset: int, length: int, *, flags: int = 0, cookie: int = 7,
                magic: int = EXT_REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQQ", magic, flags, cmd, cookie, offset, length)


def ext_reply_header(flags: int, rtype: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQQ", EXT_REPLY_MAGIC, flags, rtype, cookie, offset, length)


def negotiate(*options: bytes, config: HandshakeConfig | None = None) -> ServerHandshake:
    hs = ServerHandshake(config)
    hs.data_to_send()  # greeting
    hs.receive_data(struct.pack(">I", 1) + b"".join(options))
    return hs


def replies_to(*options: bytes, config: HandshakeConfig | None = None) -> bytes:
    hs = negotiate(*options, config=config)
    assert hs.next_event() is NEED_DATA
    return hs.data_to_send()


# --- negotiation ----------------------------------------------------------------------------
def test_ack_implies_structured_replies() -> None:
    hs = negotiate(opt(OPT_EXTENDED_HEADERS), opt(OPT_GO, bytes(6)))
    event = hs.next_event()
    assert isinstance(event, ExportInfoRequested)
    assert hs.data_to_send() == rep(OPT_EXTENDED_HEADERS, REP_ACK)
    hs.export_info_reply(ExportInfo(size=1 << 40, flags=TransmissionFlag.SEND_FLUSH))
    assert hs.negotiated is not None
    assert hs.negotiated.extended_headers and hs.negotiated.structured_replies
    # SEND_DF is offered as with structured replies.
    assert hs.negotiated.flags & TransmissionFlag.SEND_DF
    session = Session.from_negotiated(hs.negotiated)
    assert session.extended_headers and session.structured_replies


def test_not_negotiated_by_default() -> None:
    hs = negotiate(opt(OPT_GO, bytes(6)))
    assert isinstance(hs.next_event(), ExportInfoRequested)
    hs.export_info_reply(ExportInfo(size=512, flags=TransmissionFlag(0)))
    assert hs.negotiated is not None and not hs.negotiated.extended_headers


def test_payload_is_invalid() -> None:
    data = replies_to(opt(OPT_EXTENDED_HEADERS, b"x"))
    assert data[:16] == rep(OPT_EXTENDED_HEADERS, ERR_INVALID)[:16]


def test_repeat_is_invalid() -> None:
    data = replies_to(opt(OPT_EXTENDED_HEADERS), opt(OPT_EXTENDED_HEADERS))
    first = rep(OPT_EXTENDED_HEADERS, REP_ACK)
    assert data.startswith(first)
    assert data[len(first):len(first) + 16] == rep(OPT_EXTENDED_HEADERS, ERR_INVALID)[:16]


def test_after_structured_reply_is_acknowledged() -> None:
    data = replies_to(opt(OPT_STRUCTURED_REPLY), opt(OPT_EXTENDED_HEADERS))
    assert data == rep(OPT_STRUCTURED_REPLY, REP_ACK) + rep(OPT_EXTENDED_HEADERS, REP_ACK)


def test_structured_reply_after_extended_headers_is_refused() -> None:
    data = replies_to(opt(OPT_EXTENDED_HEADERS), opt(OPT_STRUCTURED_REPLY))
    first = rep(OPT_EXTENDED_HEADERS, REP_ACK)
    assert data[len(first):len(first) + 16] == \
        rep(OPT_STRUCTURED_REPLY, ERR_EXT_HEADER_REQD)[:16]


@pytest.mark.parametrize("config", [HandshakeConfig(extended_headers=False),
                                    HandshakeConfig(structured_replies=False)])
def test_disabled_is_unsupported(config: HandshakeConfig) -> None:
    data = replies_to(opt(OPT_EXTENDED_HEADERS), config=config)
    assert data[:16] == rep(OPT_EXTENDED_HEADERS, ERR_UNSUP)[:16]


def test_starttls_wipes_it() -> None:
    hs = ServerHandshake(HandshakeConfig())
    hs.extended_headers = hs.structured_replies = True
    hs._reset_negotiated_state()
    assert not hs.extended_headers and not hs.structured_replies


# --- requests -------------------------------------------------------------------------------
def parse(data: bytes) -> list[Request]:
    parser = RequestParser(extended=True)
    parser.receive_data(data)
    out = []
    while (req := parser.next_request()) is not NEED_DATA:
        assert isinstance(req, Request)
        out.append(req)
    return out


def test_request_header_is_32_bytes_with_64_bit_length() -> None:
    header = ext_request(Cmd.WRITE_ZEROES, 3 * GIB4, 5 * GIB4, cookie=0x1122334455667788)
    assert len(header) == 32
    assert parse(header) == [Request(Cmd.WRITE_ZEROES, 0, 0x1122334455667788, 3 * GIB4,
                                     5 * GIB4)]
    assert parse(header[:31]) == []


def test_write_payload_with_and_without_payload_len() -> None:
    data = b"abcd" * 3
    stream = (ext_request(Cmd.WRITE, 0, 12, flags=PAYLOAD_LEN, cookie=1) + data
              + ext_request(Cmd.WRITE, 12, 12, cookie=2) + data
              + ext_request(Cmd.FLUSH, 0, 0, cookie=3))
    reqs = parse(stream)
    assert [(r.cmd, r.cookie, r.data) for r in reqs] == [
        (Cmd.WRITE, 1, data), (Cmd.WRITE, 2, data), (Cmd.FLUSH, 3, None)]


def test_unexpected_payload_is_skipped() -> None:
    stream = (ext_request(Cmd.READ, 0, 5, flags=PAYLOAD_LEN, cookie=1) + b"12345"
              + ext_request(Cmd.FLUSH, 0, 0, cookie=2))
    assert [r.cookie for r in parse(stream)] == [1, 2]


@pytest.mark.parametrize("magic", [REQUEST_MAGIC, 0])
def test_other_magic_is_a_violation(magic: int) -> None:
    with pytest.raises(ProtocolViolation):
        parse(ext_request(Cmd.READ, 0, 512, magic=magic))


def test_compact_parser_refuses_extended_magic() -> None:
    parser = RequestParser()
    parser.receive_data(ext_request(Cmd.READ, 0, 512))
    with pytest.raises(ProtocolViolation):
        parser.next_request()


SIZE = 16 * GIB4
ALL = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
       | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
       | TransmissionFlag.SEND_CACHE)
EXT = Session(b"", SIZE, ALL, True, 1, True)
COMPACT = Session(b"", SIZE, ALL, True, 1)


def check(cmd: int, offset: int, length: int, flags: int = 0,
          session: Session = EXT) -> int:
    try:
        validate_request(Request(cmd, flags, 1, offset, length), session)
    except RequestError as err:
        return err.errno
    return 0


@pytest.mark.parametrize("cmd", [Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS])
def test_64_bit_lengths_allowed(cmd: Cmd) -> None:
    assert check(cmd, GIB4, 8 * GIB4) == 0
    assert check(cmd, 0, SIZE) == 0


def test_64_bit_offset_plus_length_overflow_is_out_of_range() -> None:
    assert check(Cmd.TRIM, 2**64 - 1, 2**64 - 1) == errno.EINVAL
    assert check(Cmd.WRITE_ZEROES, SIZE - 1, 2) == errno.ENOSPC
    assert check(Cmd.BLOCK_STATUS, 2**63, 2**63) == errno.EINVAL


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE])
def test_data_requests_keep_the_64_mib_limit(cmd: Cmd) -> None:
    assert check(cmd, 0, 64 * 1024 * 1024) == 0
    assert check(cmd, 0, GIB4) == errno.ENOMEM


def test_payload_len_flag() -> None:
    assert check(Cmd.WRITE, 0, 512, PAYLOAD_LEN) == 0
    assert check(Cmd.WRITE, 0, 512, PAYLOAD_LEN | FUA) == 0
    assert check(Cmd.READ, 0, 512, PAYLOAD_LEN) == errno.EINVAL
    assert check(Cmd.BLOCK_STATUS, 0, 512, PAYLOAD_LEN) == errno.EINVAL
    # Without extended headers it is an unknown flag.
    assert check(Cmd.WRITE, 0, 512, PAYLOAD_LEN, COMPACT) == errno.EINVAL


def test_block_status_payload_is_parsed() -> None:
    """NBD_FLAG_BLOCK_STAT_PAYLOAD: the payload's u64 becomes the length, the whole payload
    the data; one longer than MAX_STATUS_PAYLOAD is dropped, and the stream stays in step."""
    payload = struct.pack(">QII", 3 * GIB4, 1, 2)
    huge = MAX_STATUS_PAYLOAD + 4
    stream = (ext_request(Cmd.BLOCK_STATUS, GIB4, len(payload), flags=PAYLOAD_LEN, cookie=1)
              + payload
              + ext_request(Cmd.BLOCK_STATUS, 0, huge, flags=PAYLOAD_LEN, cookie=2)
              + bytes(huge)
              + ext_request(Cmd.BLOCK_STATUS, 0, 2, flags=PAYLOAD_LEN, cookie=3) + b"ab"
              + ext_request(Cmd.FLUSH, 0, 0, cookie=4))
    reqs = parse(stream)
    assert [(r.cookie, r.offset, r.length, r.data) for r in reqs] == [
        (1, GIB4, 3 * GIB4, payload), (2, 0, huge, None), (3, 0, 0, b"ab"), (4, 0, 0, None)]
    selected = Session(b"", SIZE, ALL | TransmissionFlag.BLOCK_STAT_PAYLOAD, True, 1, True,
                       ((1, b"base:allocation"), (2, b"x:y")))
    assert status_payload_ids(reqs[0], selected) == [1, 2]
    for bad in (reqs[1], reqs[2]):
        with pytest.raises(RequestError):
            status_payload_ids(bad, selected)
    with pytest.raises(RequestError):  # not advertised
        status_payload_ids(reqs[0], EXT)


# --- replies --------------------------------------------------------------------------------
def join(buffers: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def test_none_reply() -> None:
    # NBD_REPLY_TYPE_NONE (0) with NBD_REPLY_FLAG_DONE: the success of a command without data.
    assert ext_reply(0xAB, 4096) == ext_reply_header(1, 0, 0xAB, 4096, 0)
    assert len(ext_reply(0, 0)) == 32


def test_read_reply() -> None:
    data = b"hello"
    assert join(ext_read_reply(9, GIB4, data)) == (
        ext_reply_header(1, 1, 9, GIB4, 8 + 5) + struct.pack(">Q", GIB4) + data)


def test_error_reply() -> None:
    assert join(ext_error_reply(9, 512, NbdError.NOSPC, b"full")) == (
        ext_reply_header(1, 2**15 + 1, 9, 512, 6 + 4) + struct.pack(">IH", 28, 4) + b"full")
    assert join(ext_error_reply(9, 0, NbdError.IO)) == (
        ext_reply_header(1, 2**15 + 1, 9, 0, 6) + struct.pack(">IH", 5, 0))


def test_block_status_ext_reply() -> None:
    extents = [(5 * GIB4, 3), (4096, 0)]
    assert join(ext_block_status_reply(9, 0, 1, extents)) == (
        ext_reply_header(1, 6, 9, 0, 8 + 2 * 16) + struct.pack(">II", 1, 2)
        + struct.pack(">QQ", 5 * GIB4, 3) + struct.pack(">QQ", 4096, 0))
