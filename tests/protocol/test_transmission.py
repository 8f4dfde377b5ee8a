"""RequestParser and validate_request against proto.md "Transmission" / "Request types" and
the validation table of nbdkit.md §4 (which luanbd follows where the spec says SHOULD)."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from luanbd.protocol.constants import Cmd, TransmissionFlag
from luanbd.protocol.errors import ProtocolViolation, RequestError, nbd_error_for
from luanbd.protocol.handshake import NEED_DATA
from luanbd.protocol.transmission import (
    Request,
    RequestParser,
    Session,
    validate_request,
)

from . import vectors as v

# =========================================================================================
# Parsing
# =========================================================================================


def _request_params() -> list[object]:
    return [pytest.param(row, id=row.name) for row in v.REQUEST_VECTORS]


@pytest.mark.parametrize("chunker", list(v.CHUNKERS), ids=list(v.CHUNKERS))
@pytest.mark.parametrize("row", _request_params())
def test_request_vector(row: v.RequestVector, chunker: str) -> None:
    got, violation, _ = v.run_requests(row.data, v.CHUNKERS[chunker])
    assert got == list(row.requests)
    assert (violation is not None) == row.violation


@pytest.mark.parametrize("row", _request_params())
def test_request_vector_with_trailing_data(row: v.RequestVector) -> None:
    """A partial header after the row's requests yields nothing more and stays buffered."""
    partial = v.request(v.CMD_READ, cookie=99, length=1)[:27]
    for chunker in (v.whole, v.bytewise):
        got, violation, parser = v.run_requests(row.data + partial, chunker)
        assert got == list(row.requests)
        assert (violation is not None) == row.violation
        if not row.violation:
            assert parser.buffered == len(partial)
            assert parser.next_request() is NEED_DATA


def test_request_vector_names_are_unique() -> None:
    names = [row.name for row in v.REQUEST_VECTORS]
    assert len(names) == len(set(names))


def test_known_commands_are_typed() -> None:
    (req,), _, _ = v.run_requests(v.request(v.CMD_WRITE_ZEROES, length=1))
    assert req.cmd is Cmd.WRITE_ZEROES
    (req,), _, _ = v.run_requests(v.request(99, length=1))
    assert req.cmd == 99
    assert not isinstance(req.cmd, Cmd)


def test_write_payload_split_across_feeds() -> None:
    """'The client MUST follow the request header with *length* number of bytes': the
    request is complete only when the last payload byte has arrived."""
    payload = bytes(range(256)) * 4
    data = v.request(v.CMD_WRITE, cookie=5, offset=4096, data=payload) + v.request(v.CMD_FLUSH)
    parser = RequestParser()
    parser.receive_data(data[:10])
    assert parser.next_request() is NEED_DATA
    parser.receive_data(data[10:28 + 100])  # header complete, payload not
    assert parser.next_request() is NEED_DATA
    parser.receive_data(data[28 + 100:28 + 1023])  # one byte short
    assert parser.next_request() is NEED_DATA
    parser.receive_data(data[28 + 1023:])
    assert parser.next_request() == Request(Cmd.WRITE, 0, 5, 4096, 1024, payload)
    assert parser.next_request() == Request(Cmd.FLUSH, 0, 0, 0, 0, None)
    assert parser.next_request() is NEED_DATA
    assert parser.buffered == 0


def test_initial_bytes_from_the_handshake() -> None:
    """Negotiated.trailing_data is handed to the parser's constructor."""
    data = v.request(v.CMD_READ, cookie=1, length=1) + v.request(v.CMD_DISC)
    parser = RequestParser(data[:40])
    assert parser.next_request() == Request(Cmd.READ, 0, 1, 0, 1, None)
    assert parser.next_request() is NEED_DATA
    parser.receive_data(data[40:])
    assert parser.next_request() == Request(Cmd.DISC, 0, 0, 0, 0, None)


def test_bad_magic_after_good_requests() -> None:
    parser = RequestParser()
    parser.receive_data(v.request(v.CMD_FLUSH, cookie=1) + v.request(v.CMD_FLUSH, magic=0x12345678))
    assert parser.next_request() == Request(Cmd.FLUSH, 0, 1, 0, 0, None)
    with pytest.raises(ProtocolViolation):
        parser.next_request()


_BIG = v.MAX_REQUEST_SIZE + 1
_MiB = 1024 * 1024


def _feed(parser: RequestParser, data: bytes, size: int = _MiB) -> list[Request]:
    got = []
    for pos in range(0, len(data), size):
        parser.receive_data(data[pos:pos + size])
        while (req := parser.next_request()) is not NEED_DATA:
            assert isinstance(req, Request)
            got.append(req)
    return got


@pytest.mark.parametrize("head", [0, 1, 1000, _MiB + 3])
def test_oversize_write_payload_is_dropped(head: int) -> None:
    """nbdkit.md §4: READ/WRITE count > 64 MiB -> ENOMEM, and 'An oversize WRITE payload is
    read and thrown away ... so the stream stays in step'.  ``head`` payload bytes arrive in
    the same read as the header."""
    header = v.request(v.CMD_WRITE, cookie=77, length=_BIG)
    follow = v.request(v.CMD_READ, cookie=78, offset=512, length=512)
    parser = RequestParser()
    payload = b"\xa5" * _BIG
    first = _feed(parser, header + payload[:head], size=len(header) + head)
    assert first == [Request(Cmd.WRITE, 0, 77, 0, _BIG, None)]
    got = _feed(parser, payload[head:] + follow)
    assert got == [Request(Cmd.READ, 0, 78, 512, 512, None)]
    assert parser.buffered == 0
    with pytest.raises(RequestError) as info:
        validate_request(first[0], _session(size=2 * v.MAX_REQUEST_SIZE))
    assert info.value.errno == errno.ENOMEM


def test_oversize_write_next_request_in_same_read_as_payload_tail() -> None:
    header = v.request(v.CMD_WRITE, cookie=1, length=_BIG)
    follow = v.request(v.CMD_FLUSH, cookie=2) + v.request(v.CMD_DISC, cookie=3)
    parser = RequestParser()
    assert _feed(parser, header) == [Request(Cmd.WRITE, 0, 1, 0, _BIG, None)]
    stream = bytes(_BIG) + follow
    # odd read sizes so a read straddles the end of the payload
    got = _feed(parser, stream, size=3 * _MiB + 7)
    assert got == [Request(Cmd.FLUSH, 0, 2, 0, 0, None), Request(Cmd.DISC, 0, 3, 0, 0, None)]


def test_write_of_exactly_64mib_keeps_its_payload() -> None:
    payload = b"\x5a" * v.MAX_REQUEST_SIZE
    parser = RequestParser()
    got = _feed(parser, v.request(v.CMD_WRITE, cookie=1, data=payload), size=8 * _MiB)
    assert len(got) == 1
    assert got[0].length == v.MAX_REQUEST_SIZE
    assert got[0].data == payload


def test_oversize_read_has_no_payload_to_drop() -> None:
    """Only NBD_CMD_WRITE carries data: an oversize READ is just a header."""
    data = v.request(v.CMD_READ, cookie=1, length=_BIG) + v.request(v.CMD_FLUSH, cookie=2)
    got, violation, _ = v.run_requests(data)
    assert violation is None
    assert got == [Request(Cmd.READ, 0, 1, 0, _BIG, None), Request(Cmd.FLUSH, 0, 2, 0, 0, None)]


# =========================================================================================
# validate_request: one case per row of nbdkit.md §4's table
# =========================================================================================

_T = v.SPEC_TRANSMISSION_FLAGS
#: Everything advertised, as a default Lua plugin with SR would have it (plus FLUSH, CACHE).
ALL_FLAGS = (_T["NBD_FLAG_HAS_FLAGS"] | _T["NBD_FLAG_SEND_FLUSH"] | _T["NBD_FLAG_SEND_FUA"]
             | _T["NBD_FLAG_SEND_TRIM"] | _T["NBD_FLAG_SEND_WRITE_ZEROES"] | _T["NBD_FLAG_SEND_DF"]
             | _T["NBD_FLAG_SEND_CACHE"] | _T["NBD_FLAG_SEND_FAST_ZERO"])
SIZE = 1024 * 1024


def _session(*, size: int = SIZE, flags: int = ALL_FLAGS, without: int = 0, sr: bool = True,
             base: int | None = 1, read_only: bool = False) -> Session:
    flags &= ~without
    if read_only:
        flags |= _T["NBD_FLAG_READ_ONLY"]
    return Session(b"", size, TransmissionFlag(flags), sr, base)


def _req(cmd: int, offset: int = 0, length: int = 512, flags: int = 0) -> Request:
    """A request as RequestParser makes it: known commands are ``Cmd`` members (the
    ``Request.cmd`` contract; validate_request compares known commands by identity)."""
    data = bytes(length) if cmd == v.CMD_WRITE and length <= 4096 else None
    typed = Cmd(cmd) if cmd in v.SPEC_COMMANDS.values() else cmd
    return Request(typed, flags, 0xC0FFEE, offset, length, data)


@dataclass(frozen=True)
class Case:
    name: str
    request: Request
    session: Session
    errno: int
    #: The NBD error the client sees (proto.md "Error values").
    wire: int
    source: str = ""


EPERM, EINVAL, ENOSPC, ENOMEM = (v.SPEC_ERRORS[n] for n in
                                 ("NBD_EPERM", "NBD_EINVAL", "NBD_ENOSPC", "NBD_ENOMEM"))
RO = _session(read_only=True)
R, W, D, F, T, C, Z, B = (v.CMD_READ, v.CMD_WRITE, v.CMD_DISC, v.CMD_FLUSH, v.CMD_TRIM,
                          v.CMD_CACHE, v.CMD_WRITE_ZEROES, v.CMD_BLOCK_STATUS)
_RANGED = ((R, errno.EINVAL, EINVAL), (W, errno.ENOSPC, ENOSPC), (T, errno.EINVAL, EINVAL),
           (Z, errno.ENOSPC, ENOSPC), (C, errno.EINVAL, EINVAL), (B, errno.EINVAL, EINVAL))
_CMD_NAMES = {value: name.removeprefix("NBD_CMD_").lower()
              for name, value in v.SPEC_COMMANDS.items()}

CASES: list[Case] = [
    # -- write/trim/zero on a read-only export -> EPERM (EROFS mapped)
    *(Case(f"readonly-{_CMD_NAMES[cmd]}", _req(cmd), RO, errno.EROFS, EPERM,
           "proto.md: SHOULD return NBD_EPERM if it receives a write or trim request on a "
           "read-only export")
      for cmd in (W, T, Z)),
    # -- count = 0, or offset+count > size -> ENOSPC for WRITE/WRITE_ZEROES, EINVAL otherwise
    *(Case(f"count-zero-{_CMD_NAMES[cmd]}", _req(cmd, length=0), _session(), code, wire,
           "nbdkit.md §4: count = 0 is out of range")
      for cmd, code, wire in _RANGED),
    *(Case(f"past-end-{_CMD_NAMES[cmd]}", _req(cmd, offset=SIZE - 511), _session(), code, wire,
           "proto.md: SHOULD return NBD_ENOSPC if it receives a write request including one or "
           "more sectors beyond the size of the device ... NBD_EINVAL if it receives a read or "
           "trim request including one or more sectors beyond the size")
      for cmd, code, wire in _RANGED),
    *(Case(f"offset-beyond-end-{_CMD_NAMES[cmd]}", _req(cmd, offset=2**64 - 1, length=1),
           _session(), code, wire)
      for cmd, code, wire in _RANGED),
    # -- FLUSH with offset/count != 0 -> EINVAL
    Case("flush-offset", _req(F, offset=512, length=0), _session(), errno.EINVAL, EINVAL,
         "proto.md: For a flush request, *length* and *offset* are reserved, and MUST be set "
         "to all-zero"),
    Case("flush-count", _req(F, length=512), _session(), errno.EINVAL, EINVAL),
    # -- unknown command -> EINVAL
    Case("unknown-command-8", _req(8), _session(), errno.EINVAL, EINVAL,
         "proto.md: SHOULD return NBD_EINVAL if it receives an unknown command"),
    Case("unknown-command-99", _req(99, length=0), _session(), errno.EINVAL, EINVAL),
    Case("unknown-command-ffff", _req(0xFFFF), _session(), errno.EINVAL, EINVAL),
    # -- flags -> EINVAL
    Case("unknown-flag-bit5", _req(R, flags=1 << 5), _session(), errno.EINVAL, EINVAL,
         "proto.md: SHOULD return NBD_EINVAL if it receives an unknown command flag"),
    Case("unknown-flag-bit15", _req(W, flags=1 << 15), _session(), errno.EINVAL, EINVAL),
    Case("no-hole-on-write", _req(W, flags=v.FLAG_NO_HOLE), _session(), errno.EINVAL, EINVAL,
         "proto.md: SHOULD return NBD_EINVAL if it receives a request with a flag not "
         "explicitly documented as applicable to the given request"),
    Case("fast-zero-on-write", _req(W, flags=v.FLAG_FAST_ZERO), _session(), errno.EINVAL,
         EINVAL),
    Case("fast-zero-not-advertised", _req(Z, flags=v.FLAG_FAST_ZERO),
         _session(without=_T["NBD_FLAG_SEND_FAST_ZERO"]), errno.EINVAL, EINVAL,
         "proto.md: If the server did not advertise NBD_FLAG_SEND_FAST_ZERO ... SHOULD fail "
         "with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set"),
    Case("df-on-write", _req(W, flags=v.FLAG_DF), _session(), errno.EINVAL, EINVAL),
    Case("df-without-sr", _req(R, flags=v.FLAG_DF),
         _session(sr=False, base=None, without=v.SEND_DF), errno.EINVAL, EINVAL,
         "proto.md: [NBD_CMD_FLAG_DF] MUST NOT be set unless the transmission flags include "
         "NBD_FLAG_SEND_DF"),
    Case("req-one-on-read", _req(R, flags=v.FLAG_REQ_ONE), _session(), errno.EINVAL, EINVAL),
    Case("fua-not-advertised", _req(W, flags=v.FLAG_FUA),
         _session(without=_T["NBD_FLAG_SEND_FUA"]), errno.EINVAL, EINVAL,
         "proto.md: NBD_CMD_FLAG_FUA; This flag is valid for all commands, provided "
         "NBD_FLAG_SEND_FUA has been negotiated"),
    # -- READ/WRITE count > 64 MiB -> ENOMEM
    Case("read-too-large", _req(R, length=_BIG), _session(size=4 * v.MAX_REQUEST_SIZE),
         errno.ENOMEM, ENOMEM, "nbdkit.md §4: data request is too large"),
    Case("write-too-large", _req(W, length=_BIG), _session(size=4 * v.MAX_REQUEST_SIZE),
         errno.ENOMEM, ENOMEM),
    # -- FLUSH/TRIM/ZERO/CACHE not advertised -> EINVAL
    Case("flush-not-advertised", _req(F, length=0), _session(without=_T["NBD_FLAG_SEND_FLUSH"]),
         errno.EINVAL, EINVAL,
         "proto.md: A client MUST NOT send a flush request unless NBD_FLAG_SEND_FLUSH was set"),
    Case("trim-not-advertised", _req(T), _session(without=_T["NBD_FLAG_SEND_TRIM"]),
         errno.EINVAL, EINVAL),
    Case("zero-not-advertised", _req(Z),
         _session(without=_T["NBD_FLAG_SEND_WRITE_ZEROES"] | _T["NBD_FLAG_SEND_FAST_ZERO"]),
         errno.EINVAL, EINVAL),
    Case("cache-not-advertised", _req(C), _session(without=_T["NBD_FLAG_SEND_CACHE"]),
         errno.EINVAL, EINVAL),
    # -- BLOCK_STATUS without SR or without base:allocation -> EINVAL
    Case("block-status-without-sr", _req(B), _session(sr=False, base=None, without=v.SEND_DF),
         errno.EINVAL, EINVAL,
         "proto.md: The reply to the NBD_CMD_BLOCK_STATUS request MUST be sent as a structured "
         "reply"),
    Case("block-status-without-context", _req(B), _session(base=None), errno.EINVAL, EINVAL,
         "proto.md: Servers SHOULD reply with NBD_EINVAL to clients sending "
         "NBD_CMD_BLOCK_STATUS without selecting at least one metadata context"),
    # -- order: the first failing check decides the error
    Case("order-readonly-beats-range", _req(W, offset=SIZE), RO, errno.EROFS, EPERM),
    Case("order-readonly-beats-flags", _req(Z, flags=1 << 9), RO, errno.EROFS, EPERM),
    Case("order-readonly-beats-not-advertised", _req(T),
         _session(read_only=True, without=_T["NBD_FLAG_SEND_TRIM"]), errno.EROFS, EPERM),
    Case("order-range-beats-too-large", _req(R, length=_BIG),
         _session(size=v.MAX_REQUEST_SIZE), errno.EINVAL, EINVAL,
         "nbdkit.md §4: a >64M read past the end gets EINVAL, not ENOMEM"),
    Case("order-range-beats-too-large-write", _req(W, length=_BIG),
         _session(size=v.MAX_REQUEST_SIZE), errno.ENOSPC, ENOSPC),
    Case("order-range-beats-flags", _req(W, offset=SIZE, flags=1 << 9), _session(),
         errno.ENOSPC, ENOSPC),
    Case("order-range-beats-not-advertised", _req(Z, offset=SIZE),
         _session(without=_T["NBD_FLAG_SEND_WRITE_ZEROES"]), errno.ENOSPC, ENOSPC),
    Case("order-flags-beat-too-large", _req(R, length=_BIG, flags=v.FLAG_REQ_ONE),
         _session(size=4 * v.MAX_REQUEST_SIZE), errno.EINVAL, EINVAL),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_validate_request_refuses(case: Case) -> None:
    with pytest.raises(RequestError) as info:
        validate_request(case.request, case.session)
    assert info.value.errno == case.errno
    assert nbd_error_for(info.value.errno, case.request.flags) == case.wire
    assert str(info.value), "the error carries a log message"


def test_validate_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


VALID: list[tuple[str, Request, Session]] = [
    ("read", _req(R), _session()),
    ("read-to-the-end", _req(R, offset=SIZE - 512), _session()),
    ("read-whole-export", _req(R, length=SIZE), _session()),
    ("read-64MiB", _req(R, length=v.MAX_REQUEST_SIZE), _session(size=v.MAX_REQUEST_SIZE)),
    ("read-df", _req(R, flags=v.FLAG_DF), _session()),
    ("read-unaligned", _req(R, offset=1, length=3), _session()),
    ("read-readonly", _req(R), RO),
    ("write-fua", _req(W, flags=v.FLAG_FUA), _session()),
    ("flush", _req(F, length=0), _session()),
    ("flush-fua", _req(F, length=0, flags=v.FLAG_FUA), _session()),
    ("flush-readonly", _req(F, length=0), RO),
    ("trim-fua", _req(T, flags=v.FLAG_FUA), _session()),
    # "For all other commands, where the length is not reflected in the payload ... a server
    # SHOULD merely fail the command ... for a client that exceeds the maximum block size":
    # no maximum is advertised, so a TRIM/ZERO/CACHE/BLOCK_STATUS longer than 64 MiB is fine.
    ("trim-larger-than-64MiB", _req(T, length=_BIG), _session(size=4 * v.MAX_REQUEST_SIZE)),
    ("zero-larger-than-64MiB", _req(Z, length=_BIG), _session(size=4 * v.MAX_REQUEST_SIZE)),
    ("cache-larger-than-64MiB", _req(C, length=_BIG), _session(size=4 * v.MAX_REQUEST_SIZE)),
    ("block-status-larger-than-64MiB", _req(B, length=_BIG),
     _session(size=4 * v.MAX_REQUEST_SIZE)),
    ("zero-no-hole-fast", _req(Z, flags=v.FLAG_NO_HOLE | v.FLAG_FAST_ZERO | v.FLAG_FUA),
     _session()),
    ("zero-no-hole-without-trim", _req(Z, flags=v.FLAG_NO_HOLE),
     _session(without=_T["NBD_FLAG_SEND_TRIM"])),
    ("cache", _req(C), _session()),
    ("cache-readonly", _req(C), RO),
    ("block-status-req-one", _req(B, flags=v.FLAG_REQ_ONE), _session()),
    ("block-status-readonly", _req(B), _session(read_only=True)),
]


@pytest.mark.parametrize(("request_", "session"),
                         [pytest.param(r, s, id=name) for name, r, s in VALID])
def test_validate_request_accepts(request_: Request, session: Session) -> None:
    validate_request(request_, session)


def test_session_from_negotiated() -> None:
    client = v.MiniClient()
    client.structured_replies()
    client.go()
    negotiated = client.server.negotiated
    assert negotiated is not None
    session = Session.from_negotiated(negotiated)
    assert session.size == v.EXPORT_SIZE
    assert int(session.flags) == v.WIRE_FLAGS_SR
    assert session.structured_replies
    assert session.base_allocation_id is None
    assert not session.read_only
    # DF is now allowed, BLOCK_STATUS is not (no context selected).
    validate_request(_req(R, flags=v.FLAG_DF), session)
    with pytest.raises(RequestError):
        validate_request(_req(B), session)
