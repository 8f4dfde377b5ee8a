#!/usr/bin/env python3
"""atheris harness: luanbd's request parser (classic and extended headers) and
``validate_request``, fed arbitrary bytes cut in arbitrary pieces.

Input layout (so the seeds of fuzz/corpus/requests/ stay real request streams):

====== =====================================================================================
byte 0 session: bit 0 extended headers, bit 1 structured replies, bit 2 base:allocation
       selected, bits 3-4 export size (0, 4096, 1 MiB, 2**63), bits 5-6 parser buffer size,
       bit 7 receive through ``get_buffer``/``commit`` (as the server does) instead of
       ``receive_data``
byte 1 transmission flags, low byte (HAS_FLAGS ... SEND_DF)
byte 2 transmission flags, high byte (CAN_MULTI_CONN ... SEND_FAST_ZERO)
byte 3 chunking seed: 0 whole, else pieces of 1..seed+1 bytes
rest   the client's request stream
====== =====================================================================================

Findings: any exception but ``ProtocolViolation`` (parser) and ``RequestError`` (validation);
a parse that depends on how the stream was cut; a WRITE whose payload is not its length; a
request that passes validation although the spec forbids it.

    python fuzz/fuzz_requests.py fuzz/corpus/requests -max_total_time=60
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzlib

if __name__ == "__main__":
    fuzzlib.instrument_luanbd()  # before anything below imports luanbd

from fuzzlib import Finding, chunks

from luanbd.protocol.constants import MAX_REQUEST_SIZE, Cmd, CmdFlag, TransmissionFlag
from luanbd.protocol.errors import ProtocolViolation, RequestError
from luanbd.protocol.handshake import NEED_DATA, _NeedData
from luanbd.protocol.transmission import (
    MAX_STATUS_PAYLOAD,
    Request,
    RequestParser,
    Session,
    validate_request,
)

SIZES = (0, 4096, 1 << 20, 1 << 63)
BUFFER_SIZES = (256 * 1024, 28, 64, 4096)

#: What parsing a stream gave: the requests (each with "ok" or the validation errno), then
#: the ProtocolViolation message that ended it, if any.
Outcome = tuple[list[tuple[Request, int]], str | None]
MakeParser = Callable[..., RequestParser]

_RANGED = (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS)
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_NEEDS: dict[int, TransmissionFlag] = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH, Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES, Cmd.CACHE: TransmissionFlag.SEND_CACHE}


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Finding(message)


def check_accepted(req: Request, session: Session) -> None:
    """``req`` passed validation: nothing the spec forbids may reach the plugin."""
    cmd, flags = req.cmd, req.flags
    expect(cmd in _RANGED or cmd is Cmd.FLUSH, f"validated unknown command {cmd}")
    if cmd in _RANGED:
        expect(req.length > 0 and req.offset + req.length <= session.size,
               f"validated out-of-range {cmd} offset={req.offset} length={req.length}")
    else:
        expect(req.offset == req.length == 0, "validated FLUSH with offset or length")
    expect(not (session.read_only and cmd in _WRITES), f"validated {cmd} on read-only export")
    if cmd in _NEEDS:
        expect(bool(session.flags & _NEEDS[cmd]), f"validated unadvertised {cmd}")
    if cmd in (Cmd.READ, Cmd.WRITE):
        expect(req.length <= MAX_REQUEST_SIZE, f"validated oversize {cmd}")
    if cmd is Cmd.WRITE:
        expect(req.data is not None and len(req.data) == req.length,
               "validated WRITE without its payload")
    if flags & CmdFlag.FUA:
        expect(bool(session.flags & TransmissionFlag.SEND_FUA), "validated unadvertised FUA")
    if flags & CmdFlag.DF:
        expect(cmd is Cmd.READ and session.structured_replies, "validated misplaced DF")
    if flags & CmdFlag.FAST_ZERO:
        expect(cmd is Cmd.WRITE_ZEROES and bool(session.flags & TransmissionFlag.SEND_FAST_ZERO),
               "validated misplaced FAST_ZERO")
    if flags & CmdFlag.NO_HOLE:
        expect(cmd is Cmd.WRITE_ZEROES, "validated misplaced NO_HOLE")
    if flags & CmdFlag.REQ_ONE:
        expect(cmd is Cmd.BLOCK_STATUS, "validated misplaced REQ_ONE")
    if flags & CmdFlag.PAYLOAD_LEN:
        expect(session.extended_headers and (
            cmd is Cmd.WRITE or (cmd is Cmd.BLOCK_STATUS and bool(
                session.flags & TransmissionFlag.BLOCK_STAT_PAYLOAD))),
            "validated misplaced PAYLOAD_LEN")
    if cmd is Cmd.BLOCK_STATUS:
        expect(session.structured_replies and bool(session.meta_contexts),
               "validated BLOCK_STATUS without a metadata context")


def run_parser(parser: RequestParser, pieces: Iterable[bytes], session: Session,
               use_buffer: bool) -> Outcome:
    """Feed ``pieces`` to ``parser`` as the server would; validate each request."""
    got: list[tuple[Request, int]] = []
    try:
        try:
            for piece in [b"", *pieces]:
                if use_buffer:
                    at = 0
                    while at < len(piece):
                        with parser.get_buffer() as view:
                            n = min(len(view), len(piece) - at)
                            expect(n > 0, "get_buffer() gave no room")
                            view[:n] = piece[at:at + n]
                        parser.commit(n)
                        at += n
                else:
                    parser.receive_data(piece)
                while (req := parser.next_request()) is not NEED_DATA:
                    expect(isinstance(req, Request), f"next_request() gave {req!r}")
                    assert isinstance(req, Request)
                    if req.cmd is Cmd.WRITE and req.length <= MAX_REQUEST_SIZE:
                        expect(req.data is not None and len(req.data) == req.length,
                               f"WRITE of {req.length} bytes came with "
                               f"{None if req.data is None else len(req.data)} bytes")
                    elif (req.cmd is Cmd.BLOCK_STATUS and req.flags & CmdFlag.PAYLOAD_LEN
                          and req.data is not None):
                        # NBD_FLAG_BLOCK_STAT_PAYLOAD: the payload is kept, its u64 (if
                        # any) is the length.
                        expect(len(req.data) <= MAX_STATUS_PAYLOAD,
                               f"a {len(req.data)}-byte BLOCK_STATUS payload was kept")
                        expect(req.length == (struct.unpack_from(">Q", req.data)[0]
                                              if len(req.data) >= 8 else 0),
                               "BLOCK_STATUS payload's length is not the request's")
                    else:
                        expect(req.data is None, f"{req.cmd} came with a payload")
                    try:
                        validate_request(req, session)
                    except RequestError as err:
                        expect(isinstance(err.errno, int) and err.errno > 0,
                               f"RequestError with errno {err.errno!r}")
                        got.append((req, err.errno))
                    else:
                        check_accepted(req, session)
                        got.append((req, 0))
        except ProtocolViolation as err:
            return got, str(err)
    except Finding:
        raise
    except Exception as err:
        raise Finding(f"{type(err).__name__}: {err}") from err
    return got, None


def decode(data: bytes) -> tuple[Session, int, bool, int, bytes]:
    """(session, parser buffer size, use get_buffer, chunk seed, stream) of one input."""
    b0 = data[0]
    flags = TransmissionFlag(data[1] | (data[2] & 0x0F) << 8)
    session = Session(b"", SIZES[b0 >> 3 & 3], flags, bool(b0 & 2),
                      1 if b0 & 4 else None, extended_headers=bool(b0 & 1))
    return session, BUFFER_SIZES[b0 >> 5 & 3], bool(b0 & 0x80), data[3], data[4:]


def check_requests(data: bytes, make_parser: MakeParser = RequestParser) -> None:
    """One input: parse it whole (as trailing handshake data) and cut in pieces; both
    parses must agree, and every request must be well-formed and validated correctly."""
    if len(data) < 4:
        return
    session, buffer_size, use_buffer, seed, stream = decode(data)
    extended = session.extended_headers
    try:
        whole_parser = make_parser(stream, buffer_size, extended=extended)
    except Exception as err:
        raise Finding(f"{type(err).__name__}: {err}") from err
    whole = run_parser(whole_parser, [], session, use_buffer)
    if seed:
        cut = run_parser(make_parser(b"", buffer_size, extended=extended),
                         chunks(stream, seed), session, use_buffer)
        expect(cut == whole, f"the parse depends on how the stream is cut:\n"
                             f"whole: {whole}\ncut:   {cut}")


class BrokenParser(RequestParser):
    """For ``LUANBD_FUZZ_INJECT``: a parser that raises KeyError on NBD_CMD_CACHE.  Shallow
    on purpose (seeds hold CACHE requests): the self-test checks that a bug is reported."""

    def next_request(self) -> Request | _NeedData:
        req = super().next_request()
        if isinstance(req, Request) and req.cmd is Cmd.CACHE:
            raise KeyError("injected bug")
        return req


def check(data: bytes) -> None:
    check_requests(data, BrokenParser if fuzzlib.injecting() else RequestParser)


if __name__ == "__main__":
    fuzzlib.main(check)
