"""ServerHandshake against the spec's negotiation phase (proto.md "Handshake", "TLS support",
"Option types"), driven by the rows of ``vectors.HANDSHAKE_VECTORS``.

Every row is fed whole, byte by byte, in odd chunk sizes, and with trailing bytes after the
last option (h11 ``tr()``): the outcome must not depend on how TCP cut the stream.
"""

from __future__ import annotations

import struct

import pytest

from luanbd.protocol.constants import HandshakeFlag, Rep, TransmissionFlag
from luanbd.protocol.errors import ProtocolViolation
from luanbd.protocol.handshake import (
    NEED_DATA,
    ExportInfo,
    ExportInfoRequested,
    HandshakeConfig,
    ServerHandshake,
    StartTlsRequested,
    TlsMode,
    newstyle_greeting,
    oldstyle_greeting,
)
from luanbd.protocol.transmission import Request, RequestParser, Session

from . import vectors as v

#: Found by these vectors and fixed in 37d80d8: the 32-option limit used to count calls to
#: next_event() that found an option header whose payload had not fully arrived, so the same
#: bytes cut into smaller reads exhausted the limit.  The bytewise and chunked feeds of every
#: row, and test_option_limit_counts_options_not_reads, guard against its return.


def _marks(row: v.HandshakeVector, mode: str) -> list[pytest.MarkDecorator]:
    if row.bug:
        return [pytest.mark.xfail(strict=True, reason=row.bug)]
    return []


def _params(modes: list[str]) -> list[object]:
    return [pytest.param(row, mode, id=f"{row.name}-{mode}", marks=_marks(row, mode))
            for row in v.HANDSHAKE_VECTORS for mode in modes]


#: What to append after the last option of a row, by outcome, so that it provokes nothing.
_TRAILING = {
    v.NEGOTIATING: b"IHAVEOP",  # a partial option header: no event, no reply
    v.TRANSMISSION: v.request(v.CMD_READ, cookie=42, length=512),  # the first request
    v.CLOSED: b"anything after NBD_OPT_ABORT is ignored",
    v.VIOLATION: b"\xff" * 40,
}


def _check(row: v.HandshakeVector, run: v.HandshakeRun, trailing: bytes = b"") -> None:
    assert run.events == list(row.events)
    assert v.canonical(run.server) == v.canonical(row.server)
    hs = run.hs
    if row.outcome == v.VIOLATION:
        assert run.violation is not None, "expected a hard disconnect"
        return
    assert run.violation is None, f"unexpected ProtocolViolation: {run.violation}"
    assert hs.finished == (row.outcome in (v.TRANSMISSION, v.CLOSED))
    assert hs.closed == (row.outcome == v.CLOSED)
    if row.outcome == v.NEGOTIATING:
        assert hs.negotiated is None
        assert hs.next_event() is NEED_DATA
    if row.outcome == v.CLOSED:
        assert hs.negotiated is None
    if row.outcome == v.TRANSMISSION:
        negotiated = hs.negotiated
        assert negotiated is not None
        expected = dict(row.negotiated)
        base = expected.pop("base_allocation", None)
        for name, value in expected.items():
            assert getattr(negotiated, name) == value, name
        if base is not None:
            assert (negotiated.base_allocation_id is not None) == base, "base:allocation"
        # Bytes after the option that ended negotiation belong to the transmission phase.
        assert negotiated.trailing_data + run.unfed == trailing


@pytest.mark.parametrize(("row", "chunker"), _params(list(v.CHUNKERS)))
def test_vector(row: v.HandshakeVector, chunker: str) -> None:
    run = v.run_handshake(row, v.CHUNKERS[chunker])
    _check(row, run)


@pytest.mark.parametrize(("row", "mode"), _params(["trailing"]))
def test_vector_with_trailing_data(row: v.HandshakeVector, mode: str) -> None:
    trailing = _TRAILING[row.outcome]
    for chunker in (v.whole, v.bytewise):
        run = v.run_handshake(row, chunker, trailing)
        _check(row, run, trailing)


def test_vector_names_are_unique() -> None:
    names = [row.name for row in v.HANDSHAKE_VECTORS]
    assert len(names) == len(set(names))


def test_option_limit_counts_options_not_reads() -> None:
    """One option is one option however TCP cut it.  proto.md allows a hard disconnect only
    for a violation or "if a server believes a client's behaviour constitutes a denial of
    service"; otherwise "A party MUST NOT initiate a hard disconnect save where set out in
    this section"."""
    hs = ServerHandshake()
    hs.data_to_send()
    data = v.CF + v.opt_info(b"x" * 40)
    events = []
    for i in range(len(data)):
        hs.receive_data(data[i:i + 1])
        event = hs.next_event()  # raised ProtocolViolation before 37d80d8
        if event is not NEED_DATA:
            events.append(event)
    assert events == [v.info_event(v.OPT_INFO, b"x" * 40, ())]


def test_option_limit_same_option_two_reads() -> None:
    """Even without the bug biting, an option split in two reads gives the same event."""
    hs = ServerHandshake()
    hs.data_to_send()
    data = v.CF + v.opt_info(b"x" * 40)
    hs.receive_data(data[:30])
    assert hs.next_event() is NEED_DATA
    hs.receive_data(data[30:])
    assert hs.next_event() == v.info_event(v.OPT_INFO, b"x" * 40, ())


# --- greeting -----------------------------------------------------------------------------
def test_greeting_bytes() -> None:
    # S: NBDMAGIC, S: IHAVEOPT, S: 16 bits handshake flags (FIXED_NEWSTYLE | NO_ZEROES).
    assert ServerHandshake().data_to_send() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert newstyle_greeting(HandshakeFlag.FIXED_NEWSTYLE) == b"NBDMAGICIHAVEOPT\x00\x01"


def test_greeting_masked_flags() -> None:
    hs = ServerHandshake(HandshakeConfig(handshake_flags=HandshakeFlag(0)))
    assert hs.data_to_send() == b"NBDMAGICIHAVEOPT\x00\x00"
    assert hs.data_to_send() == b"", "the greeting is sent once"


def test_oldstyle_greeting_bytes() -> None:
    # S: NBDMAGIC, S: 0x00420281861253, S: 64 bits size, S: 32 bits flags, S: 124 zeroes.
    data = oldstyle_greeting(0x1122334455, TransmissionFlag(0x83))
    assert data == (b"NBDMAGIC" + bytes.fromhex("0000420281861253") + bytes.fromhex(
        "0000001122334455") + bytes.fromhex("00000083") + bytes(124))
    assert len(data) == 152


def test_nothing_sent_before_client_flags() -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(b"\0\0\0")
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == b""


# --- details the rows cannot express ------------------------------------------------------
def test_set_meta_context_id_is_the_negotiated_id() -> None:
    """The id in NBD_REP_META_CONTEXT is what BLOCK_STATUS replies must carry."""
    client = v.MiniClient()
    assert client.structured_replies()
    ids = client.set_meta_context(b"", [v.BASE_ALLOCATION])
    assert set(ids) == {v.BASE_ALLOCATION}
    client.go()
    negotiated = client.server.negotiated
    assert negotiated is not None
    assert negotiated.base_allocation_id == ids[v.BASE_ALLOCATION]


def test_set_meta_context_ids_unique_per_context() -> None:
    client = v.MiniClient()
    client.structured_replies()
    ids = client.set_meta_context(b"", [v.BASE_ALLOCATION, v.BASE_ALLOCATION, b"base:"])
    # one reply per selected context, whatever the number of matching queries
    assert list(ids) == [v.BASE_ALLOCATION]


def test_info_export_flags_always_have_has_flags() -> None:
    """NBD_FLAG_HAS_FLAGS: MUST always be 1, even if the caller forgot it."""
    client = v.MiniClient()
    infos = client.go()
    size, flags = struct.unpack(">QH", infos[v.INFO_EXPORT])
    assert size == v.EXPORT_SIZE
    assert flags & v.HAS_FLAGS


def test_send_df_cleared_without_structured_replies() -> None:
    """NBD_FLAG_SEND_DF: ... MUST leave this flag clear if structured replies have not been
    negotiated."""
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(v.CF + v.opt_go())
    assert isinstance(hs.next_event(), ExportInfoRequested)
    info = ExportInfo(size=1, flags=TransmissionFlag.SEND_DF | TransmissionFlag.SEND_FLUSH)
    replies, _ = v.split_option_replies(hs.export_info_reply(info))
    _, flags = struct.unpack(">QH", replies[0].payload[2:])
    assert not flags & v.SEND_DF
    assert hs.negotiated is not None
    assert not hs.negotiated.flags & v.SEND_DF


def test_info_export_payload_length_is_12() -> None:
    client = v.MiniClient()
    infos = client.go(b"", [v.INFO_NAME, v.INFO_BLOCK_SIZE])
    assert len(infos[v.INFO_EXPORT]) == 10  # + 2 bytes of type = 12
    assert len(infos[v.INFO_BLOCK_SIZE]) == 12  # + 2 = 14
    assert infos[v.INFO_NAME] == v.CANONICAL_NAME


def test_info_name_omitted_when_unknown() -> None:
    """The server MAY ignore information requests that it does not wish to supply (other
    than NBD_INFO_EXPORT)."""
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(v.CF + v.opt_info(b"", [v.INFO_NAME, v.INFO_DESCRIPTION, v.INFO_BLOCK_SIZE]))
    assert isinstance(hs.next_event(), ExportInfoRequested)
    replies, _ = v.split_option_replies(hs.export_info_reply(ExportInfo(1, TransmissionFlag(0))))
    assert [r.reply for r in replies] == [v.REP_INFO, v.REP_ACK]
    assert struct.unpack_from(">H", replies[0].payload) == (v.INFO_EXPORT,)


def test_info_does_not_end_negotiation_go_does() -> None:
    client = v.MiniClient()
    client.option(v.OPT_INFO, v.info_payload())
    assert not client.server.finished
    client.go()
    assert client.server.finished
    assert not client.server.closed


def test_plaintext_after_starttls_is_refused() -> None:
    """After NBD_REP_ACK to STARTTLS 'all further data MUST be sent and received over TLS':
    bytes that were already buffered in plaintext must not be taken as TLS-protected."""
    hs = ServerHandshake(HandshakeConfig(tls=TlsMode.REQUIRE))
    hs.data_to_send()
    hs.receive_data(v.CF + v.option(v.OPT_STARTTLS) + v.opt_go())
    assert isinstance(hs.next_event(), StartTlsRequested)
    assert v.canonical(hs.data_to_send()) == v.canonical(v.rep(v.OPT_STARTTLS, v.REP_ACK))
    with pytest.raises(ProtocolViolation):
        hs.tls_established()


def test_starttls_ack_is_queued_before_the_event() -> None:
    hs = ServerHandshake(HandshakeConfig(tls=TlsMode.ON))
    hs.data_to_send()
    hs.receive_data(v.CF + v.option(v.OPT_STARTTLS))
    assert isinstance(hs.next_event(), StartTlsRequested)
    assert hs.data_to_send() == v.rep(v.OPT_STARTTLS, v.REP_ACK)
    assert hs.next_event() is NEED_DATA  # nothing more until the TLS handshake is done
    hs.tls_established()
    assert hs.tls_active


def test_event_must_be_answered() -> None:
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(v.CF + v.option(v.OPT_LIST) + v.option(v.OPT_LIST))
    hs.next_event()
    with pytest.raises(RuntimeError):
        hs.next_event()


def test_export_name_cannot_be_refused() -> None:
    """NBD_OPT_EXPORT_NAME: 'If the server is unwilling to allow the export, it MUST
    terminate the session' -- there is no error reply to give."""
    hs = ServerHandshake()
    hs.data_to_send()
    hs.receive_data(v.CF + v.option(v.OPT_EXPORT_NAME, b"x"))
    hs.next_event()
    with pytest.raises(RuntimeError):
        hs.option_error_reply(Rep.ERR_UNKNOWN)


def test_client_against_server_into_transmission() -> None:
    """A whole client-side negotiation, then the first requests parse from trailing bytes."""
    client = v.MiniClient()
    assert client.structured_replies()
    listed = client.option(v.OPT_LIST_META, v.meta_payload(b"", [b"base:"]))
    assert [(r.reply, r.payload[4:]) for r in listed] == [
        (v.REP_META_CONTEXT, v.BASE_ALLOCATION), (v.REP_ACK, b"")]
    ids = client.set_meta_context(b"", [v.BASE_ALLOCATION])
    # pipeline the first request right behind GO
    first = v.request(v.CMD_BLOCK_STATUS, cookie=1, length=4096)
    out = client.send(v.opt_go() + first)
    replies, rest = v.split_option_replies(out)
    assert rest == b""
    assert [r.reply for r in replies] == [v.REP_INFO, v.REP_ACK]
    negotiated = client.server.negotiated
    assert negotiated is not None
    assert negotiated.trailing_data == first
    session = Session.from_negotiated(negotiated)
    assert session.structured_replies
    assert session.base_allocation_id == ids[v.BASE_ALLOCATION]
    parser = RequestParser(negotiated.trailing_data)
    req = parser.next_request()
    assert req == Request(v.CMD_BLOCK_STATUS, 0, 1, 0, 4096, None)


def test_export_name_with_nul_closes_the_connection() -> None:
    """Found by fuzz/fuzz_handshake.py: INFO/GO refuse a name with a NUL byte
    (ERR_INVALID); NBD_OPT_EXPORT_NAME cannot be refused, so the connection is closed
    rather than a name other than the client's being opened."""
    import struct

    from luanbd.protocol.constants import IHAVEOPT, Opt
    from luanbd.protocol.errors import ProtocolViolation
    from luanbd.protocol.handshake import HandshakeConfig, ServerHandshake

    hs = ServerHandshake(HandshakeConfig())
    hs.next_event()
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 3)
                    + b"a\0b")
    with pytest.raises(ProtocolViolation, match="NUL"):
        for _ in range(5):
            hs.next_event()
