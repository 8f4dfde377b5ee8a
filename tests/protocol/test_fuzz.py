"""Property tests of the sans-IO parsers (h11's invariant): any input, cut anywhere, either
yields events or raises ProtocolViolation -- never any other exception."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from luanbd.protocol.constants import (
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Rep,
    TransmissionFlag,
)
from luanbd.protocol.errors import ProtocolViolation, RequestError
from luanbd.protocol.handshake import (
    NEED_DATA,
    AbortRequested,
    ExportInfo,
    ExportInfoRequested,
    ExportListRequested,
    ExportNameRequested,
    HandshakeConfig,
    ServerHandshake,
    StartTlsRequested,
    TlsMode,
)
from luanbd.protocol.transmission import Request, RequestParser, Session, validate_request

from . import vectors as v

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)

# --- handshake input ----------------------------------------------------------------------
OPTION_NUMBERS = st.one_of(st.sampled_from(sorted(v.SPEC_OPTIONS.values())), U32,
                           st.sampled_from([0, 12, 99]))
QUERIES = st.lists(st.one_of(st.sampled_from([b"base:", b"base:allocation", b"x-a:b", b""]),
                             st.binary(max_size=12)), max_size=3)
PAYLOADS = st.one_of(
    st.just(b""),
    st.binary(max_size=48),
    st.builds(v.info_payload, st.binary(max_size=12),
              st.lists(st.one_of(st.integers(0, 4), U16), max_size=4)),
    st.builds(v.meta_payload, st.binary(max_size=12), QUERIES),
)
OPTIONS = st.one_of(
    st.builds(v.option, OPTION_NUMBERS, PAYLOADS),
    # a length field that disagrees with the payload that follows
    st.builds(lambda o, p, n: v.option(o, p, length=n), OPTION_NUMBERS, PAYLOADS,
              st.integers(0, 80)),
    st.sampled_from([v.SR, v.SET_BASE, v.opt_go(), v.opt_info(), v.option(v.OPT_LIST),
                     v.option(v.OPT_STARTTLS), v.option(v.OPT_ABORT),
                     v.option(v.OPT_EXPORT_NAME, b"e")]),
)
PARTS = st.lists(st.one_of(OPTIONS, OPTIONS, OPTIONS, st.binary(max_size=24)), max_size=10)


def _stream(config: HandshakeConfig, data: st.DataObject) -> bytes:
    """Client flags (mostly ones the server offered, sometimes anything) and options."""
    offered = int(config.handshake_flags)
    if data.draw(st.integers(0, 9), label="odd client flags?") == 0:
        flags = data.draw(U32, label="client flags")
    else:
        flags = offered & ~data.draw(st.sampled_from([0, 0, 0, 1, 2]), label="dropped flags")
    return v.client_flags(flags) + b"".join(data.draw(PARTS, label="options"))


CONFIGS = st.builds(
    HandshakeConfig,
    handshake_flags=st.sampled_from([HandshakeFlag(0), HandshakeFlag.FIXED_NEWSTYLE]
                                    + [HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES] * 6),
    structured_replies=st.booleans(),
    meta_contexts=st.booleans(),
    tls=st.sampled_from(list(TlsMode)),
)
CHUNK_SIZES = st.lists(st.integers(1, 40), min_size=1, max_size=8)
EXPORT_INFOS = st.builds(
    ExportInfo,
    size=U64,
    flags=st.integers(0, 0xFFFF).map(TransmissionFlag),
    name=st.none() | st.binary(max_size=16),
    description=st.none() | st.binary(max_size=16),
    block_size=st.none() | st.tuples(U32, U32, U32),
)
#: Refusals a caller may choose (not TLS_REQD: the invariant below is about the machine's).
ERRORS = st.sampled_from([r for r in Rep if r & (1 << 31) and r is not Rep.ERR_TLS_REQD])
#: Messages a caller would pass (strings: no NUL).
MESSAGES = st.text(st.characters(exclude_characters="\0"), max_size=10)


def _answer(hs: ServerHandshake, ev: object, data: st.DataObject) -> bytes:
    """Answer with something plausible (success or refusal) so the machine keeps going."""
    if isinstance(ev, ExportInfoRequested):
        if data.draw(st.booleans()):
            return hs.option_error_reply(data.draw(ERRORS), data.draw(MESSAGES))
        return hs.export_info_reply(data.draw(EXPORT_INFOS))
    if isinstance(ev, ExportListRequested):
        if data.draw(st.booleans()):
            return hs.option_error_reply(data.draw(ERRORS))
        exports = data.draw(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)),
                                     max_size=3))
        return hs.export_list_reply(exports)
    if isinstance(ev, ExportNameRequested):
        return hs.export_name_reply(data.draw(EXPORT_INFOS))
    if isinstance(ev, StartTlsRequested):
        hs.tls_established()  # may raise ProtocolViolation (plaintext after STARTTLS)
        return b""
    assert isinstance(ev, AbortRequested), ev
    return b""


@settings(FUZZ, max_examples=300)
@given(config=CONFIGS, sizes=CHUNK_SIZES, data=st.data())
def test_handshake_never_crashes(config: HandshakeConfig, sizes: list[int],
                                 data: st.DataObject) -> None:
    stream = _stream(config, data)
    hs = ServerHandshake(config)
    hs.data_to_send()
    out = []
    try:
        for piece in v.chunked(sizes)(stream):
            if hs.finished:
                break
            hs.receive_data(piece)
            while (ev := hs.next_event()) is not NEED_DATA:
                out.append(hs.data_to_send())
                out.append(_answer(hs, ev, data))
    except ProtocolViolation as err:
        event(f"handshake: ProtocolViolation {str(err)[:25]}")
    else:
        event(f"handshake: {'closed' if hs.closed else 'transmission' if hs.finished else 'open'}")
    out.append(hs.data_to_send())
    server = b"".join(out)
    # Whatever was sent is well-formed: option replies, then at most one EXPORT_NAME reply.
    replies, rest = v.split_option_replies(server)
    assert len(rest) in (0, 10, 134), rest
    for r in replies:
        if r.reply & (1 << 31):
            v.check_error_message(r.payload)
    if config.tls is not TlsMode.REQUIRE:
        # NOTLS: "The server MUST NOT respond to any option request with NBD_REP_ERR_TLS_REQD"
        assert all(r.reply != v.ERR_TLS_REQD for r in replies)
    if hs.negotiated is not None:
        assert hs.negotiated.flags & v.HAS_FLAGS
        assert bool(hs.negotiated.flags & v.SEND_DF) == hs.negotiated.structured_replies
        if hs.negotiated.base_allocation_id is not None:
            assert hs.negotiated.structured_replies


# --- request parser -----------------------------------------------------------------------
def _typed(cmd: int) -> Cmd | int:
    return Cmd(cmd) if cmd in v.SPEC_COMMANDS.values() else cmd


NON_WRITE_CMDS = st.one_of(st.sampled_from([c for c in Cmd if c is not Cmd.WRITE]),
                           st.integers(8, 0xFFFF)).map(_typed)
WRITES = st.builds(lambda f, k, o, d: Request(Cmd.WRITE, f, k, o, len(d), d),
                   U16, U64, U64, st.binary(max_size=200))
OTHERS = st.builds(lambda c, f, k, o, n: Request(c, f, k, o, n, None),
                   NON_WRITE_CMDS, U16, U64, U64, U32)
VALID_REQUESTS = st.one_of(WRITES, OTHERS)
OVERSIZE_WRITE = st.builds(lambda n: v.request(v.CMD_WRITE, length=n),
                           st.integers(v.MAX_REQUEST_SIZE + 1, 2**32 - 1))
REQUEST_STREAMS = st.lists(st.one_of(VALID_REQUESTS.map(v.encode_request), st.binary(max_size=40),
                                     OVERSIZE_WRITE), max_size=8).map(b"".join)


@FUZZ
@given(stream=REQUEST_STREAMS, sizes=CHUNK_SIZES)
def test_request_parser_never_crashes(stream: bytes, sizes: list[int]) -> None:
    parser = RequestParser()
    try:
        for piece in v.chunked(sizes)(stream):
            parser.receive_data(piece)
            while (req := parser.next_request()) is not NEED_DATA:
                assert isinstance(req, Request)
                event("parser: request")
                if req.cmd == Cmd.WRITE and req.length <= v.MAX_REQUEST_SIZE:
                    assert req.data is not None
                    assert len(req.data) == req.length
                else:
                    assert req.data is None
    except ProtocolViolation:
        pass


@FUZZ
@given(requests=st.lists(VALID_REQUESTS, min_size=1, max_size=8), sizes=CHUNK_SIZES)
def test_request_roundtrip(requests: list[Request], sizes: list[int]) -> None:
    """parse(encode(r)) == r for valid requests, however the stream is cut, and
    encode(parse(x)) == x."""
    wire = [v.encode_request(r) for r in requests]
    got, violation, parser = v.run_requests(b"".join(wire), v.chunked(sizes))
    assert violation is None
    assert got == requests
    assert [type(r.cmd) for r in got] == [type(r.cmd) for r in requests]
    assert [v.encode_request(r) for r in got] == wire
    assert parser.buffered == 0


# --- validate_request ---------------------------------------------------------------------
ANY_CMD = st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF).map(_typed),
                    st.integers(0, 2**20))
ANY_REQUESTS = st.builds(Request, cmd=ANY_CMD, flags=st.one_of(U16, st.integers(0, 2**20)),
                         cookie=U64, offset=st.one_of(U64, st.integers(0, 2**70)),
                         length=st.one_of(U32, st.integers(0, 2**40)),
                         data=st.none() | st.binary(max_size=8))
SESSIONS = st.builds(Session, export_name=st.binary(max_size=4),
                     size=st.one_of(st.integers(0, 2**20), U64),
                     flags=st.integers(0, 0xFFFF).map(TransmissionFlag),
                     structured_replies=st.booleans(),
                     base_allocation_id=st.none() | U32)

_RANGED = {Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS}
_WRITES = {Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES}
_FLAG_FOR: dict[object, TransmissionFlag] = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
}
_KNOWN_FLAGS = sum(v.SPEC_COMMAND_FLAGS.values())


ALL_ADVERTISED = TransmissionFlag(0xFFFF & ~TransmissionFlag.READ_ONLY)
FLAG_SETS = st.one_of(st.just(0), st.sampled_from(list(CmdFlag)),
                      st.integers(0, sum(v.SPEC_COMMAND_FLAGS.values())), U16)


@st.composite
def _plausible(draw: st.DrawFn) -> tuple[Request, Session]:
    """A request that has a fair chance to be valid, and a session to go with it."""
    size = draw(st.integers(0, 2**40))
    flags = draw(st.one_of(st.just(ALL_ADVERTISED), st.integers(0, 0xFFFF).map(TransmissionFlag)))
    session = Session(b"", size, flags, draw(st.booleans()), draw(st.none() | st.just(1)))
    cmd = draw(st.sampled_from(list(Cmd)))
    if cmd is Cmd.FLUSH:
        offset = length = 0
    else:
        offset = draw(st.integers(0, size))
        length = draw(st.integers(0, min(size - offset, 2 * v.MAX_REQUEST_SIZE)))
    return Request(cmd, draw(FLAG_SETS), 0, offset, length, None), session


@settings(max_examples=400, deadline=None)
@given(pair=st.one_of(st.tuples(ANY_REQUESTS, SESSIONS), _plausible()))
def test_validate_request_only_raises_request_error(pair: tuple[Request, Session]) -> None:
    request, session = pair
    try:
        validate_request(request, session)
    except RequestError as err:
        assert isinstance(err.errno, int)
        event(f"validate: errno {err.errno}")
        return
    event("validate: passed")
    # It passed: then nothing the spec forbids the client to send reaches the plugin.
    cmd, flags = request.cmd, request.flags
    assert cmd in _RANGED or cmd is Cmd.FLUSH
    assert not flags & ~_KNOWN_FLAGS
    if cmd in _RANGED:
        assert request.length > 0
        assert request.offset + request.length <= session.size
    else:
        assert request.offset == request.length == 0
    if session.read_only:
        assert cmd not in _WRITES
    if cmd in _FLAG_FOR:
        assert session.flags & _FLAG_FOR[cmd]
    if cmd in (Cmd.READ, Cmd.WRITE):
        assert request.length <= v.MAX_REQUEST_SIZE
    if flags & CmdFlag.FUA:
        assert session.flags & TransmissionFlag.SEND_FUA
    if flags & (CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO):
        assert cmd is Cmd.WRITE_ZEROES
    if flags & CmdFlag.FAST_ZERO:
        assert session.flags & TransmissionFlag.SEND_FAST_ZERO
    if flags & CmdFlag.DF:
        assert cmd is Cmd.READ
        assert session.structured_replies
    if flags & CmdFlag.REQ_ONE:
        assert cmd is Cmd.BLOCK_STATUS
    if cmd is Cmd.BLOCK_STATUS:
        assert session.structured_replies
        assert session.base_allocation_id is not None


def test_struct_encoding_helpers_agree_with_spec_layout() -> None:
    """The test-side encoder itself: 28-byte header in network byte order."""
    data = v.request(v.CMD_READ, flags=1, cookie=2, offset=3, length=4)
    assert data == struct.pack(">IHHQQI", 0x25609513, 1, 0, 2, 3, 4)
    assert len(data) == 28
