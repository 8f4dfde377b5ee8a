"""Byte-level NBD vectors, written from the NBD spec and not captured from luanbd's output.

Source: ``doc/proto.md`` of NetworkBlockDevice/nbd (sections "Newstyle negotiation", "Fixed
newstyle negotiation", "TLS support", "Metadata querying", "Values"); where the spec leaves a
choice open, the row follows nbdkit as described in ``/work/shared/reference/nbdkit.md`` §4
and says so.

The module has four parts:

1. the spec's numbers, typed in again from proto.md (``test_constants`` checks luanbd's enums
   against them, and nothing here imports luanbd's constants);
2. a tiny client-side encoder (what a client sends) and the server replies the spec mandates,
   plus decoders used to compare server output where the spec allows latitude (order of
   ``NBD_REP_INFO`` replies, error message text, metadata context ids);
3. ``HANDSHAKE_VECTORS`` and ``REQUEST_VECTORS``: named rows of (client bytes, expected events,
   expected server bytes, outcome);
4. drivers that feed a row whole, byte by byte or with trailing bytes (h11's ``tr()``), and a
   ``MiniClient`` that runs a handshake client-against-server with no socket.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from luanbd.protocol.constants import HandshakeFlag, Opt, Rep, TransmissionFlag
from luanbd.protocol.errors import ProtocolViolation
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
from luanbd.protocol.transmission import Request, RequestParser

# =========================================================================================
# 1. The spec's numbers (proto.md), independent of luanbd.protocol.constants
# =========================================================================================

#: "S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC') (also known as the INIT_PASSWD)"
NBDMAGIC = 0x4E42444D41474943
#: "S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')"
IHAVEOPT = 0x49484156454F5054
#: "S: 64 bits, 0x00420281861253 (cliserv_magic, a magic number)"
CLISERV_MAGIC = 0x00420281861253
#: "S: 64 bits, 0x3e889045565a9 (magic number for replies)"
OPTION_REPLY_MAGIC = 0x3E889045565A9
#: "C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)"
REQUEST_MAGIC = 0x25609513
#: "S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC; used to be NBD_REPLY_MAGIC)"
SIMPLE_REPLY_MAGIC = 0x67446698
#: "S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)"
STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: "C: 32 bits, 0x21e41c71, magic (NBD_EXTENDED_REQUEST_MAGIC)" (extended headers)
EXTENDED_REQUEST_MAGIC = 0x21E41C71
#: "S: 32 bits, 0x6e8a278c, magic (NBD_EXTENDED_REPLY_MAGIC)" (extended headers)
EXTENDED_REPLY_MAGIC = 0x6E8A278C
#: proto.md "Reserved Magic values": historic request magic, and nbd-server's log magic.
HISTORIC_REQUEST_MAGIC = 0x12560953
RESERVED_LOG_MAGIC = 0x25609514

SPEC_HANDSHAKE_FLAGS = {"NBD_FLAG_FIXED_NEWSTYLE": 1 << 0, "NBD_FLAG_NO_ZEROES": 1 << 1}
SPEC_CLIENT_FLAGS = {"NBD_FLAG_C_FIXED_NEWSTYLE": 1 << 0, "NBD_FLAG_C_NO_ZEROES": 1 << 1}
SPEC_TRANSMISSION_FLAGS = {
    "NBD_FLAG_HAS_FLAGS": 1 << 0,
    "NBD_FLAG_READ_ONLY": 1 << 1,
    "NBD_FLAG_SEND_FLUSH": 1 << 2,
    "NBD_FLAG_SEND_FUA": 1 << 3,
    "NBD_FLAG_ROTATIONAL": 1 << 4,
    "NBD_FLAG_SEND_TRIM": 1 << 5,
    "NBD_FLAG_SEND_WRITE_ZEROES": 1 << 6,
    "NBD_FLAG_SEND_DF": 1 << 7,
    "NBD_FLAG_CAN_MULTI_CONN": 1 << 8,
    "NBD_FLAG_SEND_RESIZE": 1 << 9,
    "NBD_FLAG_SEND_CACHE": 1 << 10,
    "NBD_FLAG_SEND_FAST_ZERO": 1 << 11,
    "NBD_FLAG_BLOCK_STAT_PAYLOAD": 1 << 12,
}
SPEC_OPTIONS = {
    "NBD_OPT_EXPORT_NAME": 1,
    "NBD_OPT_ABORT": 2,
    "NBD_OPT_LIST": 3,
    "NBD_OPT_PEEK_EXPORT": 4,
    "NBD_OPT_STARTTLS": 5,
    "NBD_OPT_INFO": 6,
    "NBD_OPT_GO": 7,
    "NBD_OPT_STRUCTURED_REPLY": 8,
    "NBD_OPT_LIST_META_CONTEXT": 9,
    "NBD_OPT_SET_META_CONTEXT": 10,
    # Added to proto.md with the extended-headers extension (2023).
    "NBD_OPT_EXTENDED_HEADERS": 11,
}
SPEC_REPLIES = {
    "NBD_REP_ACK": 1,
    "NBD_REP_SERVER": 2,
    "NBD_REP_INFO": 3,
    "NBD_REP_META_CONTEXT": 4,
    "NBD_REP_ERR_UNSUP": 2**31 + 1,
    "NBD_REP_ERR_POLICY": 2**31 + 2,
    "NBD_REP_ERR_INVALID": 2**31 + 3,
    "NBD_REP_ERR_PLATFORM": 2**31 + 4,
    "NBD_REP_ERR_TLS_REQD": 2**31 + 5,
    "NBD_REP_ERR_UNKNOWN": 2**31 + 6,
    "NBD_REP_ERR_SHUTDOWN": 2**31 + 7,
    "NBD_REP_ERR_BLOCK_SIZE_REQD": 2**31 + 8,
    "NBD_REP_ERR_TOO_BIG": 2**31 + 9,
    # Added to proto.md with the extended-headers extension (2023).
    "NBD_REP_ERR_EXT_HEADER_REQD": 2**31 + 10,
}
SPEC_INFO = {
    "NBD_INFO_EXPORT": 0,
    "NBD_INFO_NAME": 1,
    "NBD_INFO_DESCRIPTION": 2,
    "NBD_INFO_BLOCK_SIZE": 3,
}
SPEC_COMMANDS = {
    "NBD_CMD_READ": 0,
    "NBD_CMD_WRITE": 1,
    "NBD_CMD_DISC": 2,
    "NBD_CMD_FLUSH": 3,
    "NBD_CMD_TRIM": 4,
    "NBD_CMD_CACHE": 5,
    "NBD_CMD_WRITE_ZEROES": 6,
    "NBD_CMD_BLOCK_STATUS": 7,
}
SPEC_COMMAND_FLAGS = {
    "NBD_CMD_FLAG_FUA": 1 << 0,
    "NBD_CMD_FLAG_NO_HOLE": 1 << 1,
    "NBD_CMD_FLAG_DF": 1 << 2,
    "NBD_CMD_FLAG_REQ_ONE": 1 << 3,
    "NBD_CMD_FLAG_FAST_ZERO": 1 << 4,
    "NBD_CMD_FLAG_PAYLOAD_LEN": 1 << 5,
}
SPEC_REPLY_FLAGS = {"NBD_REPLY_FLAG_DONE": 1 << 0}
SPEC_REPLY_TYPES = {
    "NBD_REPLY_TYPE_NONE": 0,
    "NBD_REPLY_TYPE_OFFSET_DATA": 1,
    "NBD_REPLY_TYPE_OFFSET_HOLE": 2,
    "NBD_REPLY_TYPE_BLOCK_STATUS": 5,
    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT": 6,
    "NBD_REPLY_TYPE_ERROR": 2**15 + 1,
    "NBD_REPLY_TYPE_ERROR_OFFSET": 2**15 + 2,
}
SPEC_ERRORS = {
    "NBD_EPERM": 1,
    "NBD_EIO": 5,
    "NBD_ENOMEM": 12,
    "NBD_EINVAL": 22,
    "NBD_ENOSPC": 28,
    "NBD_EOVERFLOW": 75,
    "NBD_ENOTSUP": 95,
    "NBD_ESHUTDOWN": 108,
}
SPEC_STATE_FLAGS = {"NBD_STATE_HOLE": 1 << 0, "NBD_STATE_ZERO": 1 << 1}

# Short aliases used by the rows below.
FIXED = SPEC_CLIENT_FLAGS["NBD_FLAG_C_FIXED_NEWSTYLE"]
NO_ZEROES = SPEC_CLIENT_FLAGS["NBD_FLAG_C_NO_ZEROES"]
OPT_EXPORT_NAME = SPEC_OPTIONS["NBD_OPT_EXPORT_NAME"]
OPT_ABORT = SPEC_OPTIONS["NBD_OPT_ABORT"]
OPT_LIST = SPEC_OPTIONS["NBD_OPT_LIST"]
OPT_PEEK_EXPORT = SPEC_OPTIONS["NBD_OPT_PEEK_EXPORT"]
OPT_STARTTLS = SPEC_OPTIONS["NBD_OPT_STARTTLS"]
OPT_INFO = SPEC_OPTIONS["NBD_OPT_INFO"]
OPT_GO = SPEC_OPTIONS["NBD_OPT_GO"]
OPT_STRUCTURED_REPLY = SPEC_OPTIONS["NBD_OPT_STRUCTURED_REPLY"]
OPT_LIST_META = SPEC_OPTIONS["NBD_OPT_LIST_META_CONTEXT"]
OPT_SET_META = SPEC_OPTIONS["NBD_OPT_SET_META_CONTEXT"]
OPT_EXTENDED_HEADERS = SPEC_OPTIONS["NBD_OPT_EXTENDED_HEADERS"]
REP_ACK = SPEC_REPLIES["NBD_REP_ACK"]
REP_SERVER = SPEC_REPLIES["NBD_REP_SERVER"]
REP_INFO = SPEC_REPLIES["NBD_REP_INFO"]
REP_META_CONTEXT = SPEC_REPLIES["NBD_REP_META_CONTEXT"]
ERR_UNSUP = SPEC_REPLIES["NBD_REP_ERR_UNSUP"]
ERR_POLICY = SPEC_REPLIES["NBD_REP_ERR_POLICY"]
ERR_INVALID = SPEC_REPLIES["NBD_REP_ERR_INVALID"]
ERR_PLATFORM = SPEC_REPLIES["NBD_REP_ERR_PLATFORM"]
ERR_TLS_REQD = SPEC_REPLIES["NBD_REP_ERR_TLS_REQD"]
ERR_UNKNOWN = SPEC_REPLIES["NBD_REP_ERR_UNKNOWN"]
ERR_TOO_BIG = SPEC_REPLIES["NBD_REP_ERR_TOO_BIG"]
INFO_EXPORT = SPEC_INFO["NBD_INFO_EXPORT"]
INFO_NAME = SPEC_INFO["NBD_INFO_NAME"]
INFO_DESCRIPTION = SPEC_INFO["NBD_INFO_DESCRIPTION"]
INFO_BLOCK_SIZE = SPEC_INFO["NBD_INFO_BLOCK_SIZE"]
HAS_FLAGS = SPEC_TRANSMISSION_FLAGS["NBD_FLAG_HAS_FLAGS"]
SEND_DF = SPEC_TRANSMISSION_FLAGS["NBD_FLAG_SEND_DF"]
CMD_READ = SPEC_COMMANDS["NBD_CMD_READ"]
CMD_WRITE = SPEC_COMMANDS["NBD_CMD_WRITE"]
CMD_DISC = SPEC_COMMANDS["NBD_CMD_DISC"]
CMD_FLUSH = SPEC_COMMANDS["NBD_CMD_FLUSH"]
CMD_TRIM = SPEC_COMMANDS["NBD_CMD_TRIM"]
CMD_CACHE = SPEC_COMMANDS["NBD_CMD_CACHE"]
CMD_WRITE_ZEROES = SPEC_COMMANDS["NBD_CMD_WRITE_ZEROES"]
CMD_BLOCK_STATUS = SPEC_COMMANDS["NBD_CMD_BLOCK_STATUS"]
FLAG_FUA = SPEC_COMMAND_FLAGS["NBD_CMD_FLAG_FUA"]
FLAG_NO_HOLE = SPEC_COMMAND_FLAGS["NBD_CMD_FLAG_NO_HOLE"]
FLAG_DF = SPEC_COMMAND_FLAGS["NBD_CMD_FLAG_DF"]
FLAG_REQ_ONE = SPEC_COMMAND_FLAGS["NBD_CMD_FLAG_REQ_ONE"]
FLAG_FAST_ZERO = SPEC_COMMAND_FLAGS["NBD_CMD_FLAG_FAST_ZERO"]

#: proto.md "Conventions": strings "MUST be no longer than 4096 bytes".
MAX_STRING = 4096
#: nbdkit.md §4: at most 32 options before an export is chosen (+1 per export listed).
MAX_OPTIONS = 32
#: nbdkit.md §4: READ/WRITE above 64 MiB get ENOMEM.
MAX_REQUEST_SIZE = 64 * 1024 * 1024

# =========================================================================================
# 2. Client encoder, expected server replies, decoders
# =========================================================================================


def client_flags(flags: int) -> bytes:
    """'C: 32 bits, client flags'."""
    return struct.pack(">I", flags)


def option(opt: int, payload: bytes = b"", *, magic: int = IHAVEOPT,
           length: int | None = None) -> bytes:
    """'C: 64 bits IHAVEOPT, 32 bits option, 32 bits length of option data, data'."""
    size = len(payload) if length is None else length
    return struct.pack(">QII", magic, opt, size) + payload


def info_payload(name: bytes = b"", requests: Iterable[int] = (), *,
                 name_length: int | None = None, count: int | None = None) -> bytes:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 number of requests, u16 each."""
    reqs = list(requests)
    return (struct.pack(">I", len(name) if name_length is None else name_length) + name
            + struct.pack(">H", len(reqs) if count is None else count)
            + b"".join(struct.pack(">H", r) for r in reqs))


def opt_info(name: bytes = b"", requests: Iterable[int] = ()) -> bytes:
    return option(OPT_INFO, info_payload(name, requests))


def opt_go(name: bytes = b"", requests: Iterable[int] = ()) -> bytes:
    return option(OPT_GO, info_payload(name, requests))


def meta_payload(name: bytes = b"", queries: Iterable[bytes] = ()) -> bytes:
    """LIST/SET_META_CONTEXT data: u32 name length, name, u32 number of queries, then each
    query as u32 length + string."""
    qs = list(queries)
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(qs))
            + b"".join(struct.pack(">I", len(q)) + q for q in qs))


def opt_list_meta(name: bytes = b"", queries: Iterable[bytes] = ()) -> bytes:
    return option(OPT_LIST_META, meta_payload(name, queries))


def opt_set_meta(name: bytes = b"", queries: Iterable[bytes] = ()) -> bytes:
    return option(OPT_SET_META, meta_payload(name, queries))


def request(cmd: int, *, flags: int = 0, cookie: int = 0, offset: int = 0,
            length: int | None = None, data: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    """'C: 32 bits magic, 16 bits command flags, 16 bits type, 64 bits handle, 64 bits offset,
    32 bits length, (length bytes of data if the request is of type NBD_CMD_WRITE)'."""
    size = len(data) if length is None else length
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, size) + data


def encode_request(req: Request) -> bytes:
    """The bytes a client sends for a parsed :class:`Request` (used for round trips)."""
    return request(int(req.cmd), flags=req.flags, cookie=req.cookie, offset=req.offset,
                   length=req.length, data=req.data or b"")


# --- what the server must send ------------------------------------------------------------
def greeting(handshake_flags: int) -> bytes:
    """'S: NBDMAGIC, S: IHAVEOPT, S: 16 bits, handshake flags'."""
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, handshake_flags)


def rep(opt: int, reply: int, payload: bytes = b"") -> bytes:
    """'S: 64 bits magic, 32 bits option, 32 bits reply type, 32 bits length, data'."""
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, reply, len(payload)) + payload


def rep_info_export(opt: int, size: int, flags: int) -> bytes:
    """NBD_INFO_EXPORT: '*length* MUST be 12': u16 type, u64 size, u16 transmission flags."""
    return rep(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))


def rep_info_name(opt: int, name: bytes) -> bytes:
    return rep(opt, REP_INFO, struct.pack(">H", INFO_NAME) + name)


def rep_info_description(opt: int, text: bytes) -> bytes:
    return rep(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + text)


def rep_info_block_size(opt: int, minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_INFO_BLOCK_SIZE: '*length* MUST be 14'."""
    return rep(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum))


def rep_server(name: bytes, description: bytes = b"") -> bytes:
    """NBD_REP_SERVER: u32 name length, name, rest is a description."""
    return rep(OPT_LIST, REP_SERVER, struct.pack(">I", len(name)) + name + description)


def rep_meta(opt: int, context_id: int, name: bytes) -> bytes:
    """NBD_REP_META_CONTEXT: u32 context id, name."""
    return rep(opt, REP_META_CONTEXT, struct.pack(">I", context_id) + name)


def export_name_reply(size: int, flags: int, *, zeroes: bool) -> bytes:
    """Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, 124 zeroes unless NO_ZEROES."""
    return struct.pack(">QH", size, flags) + (bytes(124) if zeroes else b"")


# --- decoders -----------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionReply:
    option: int
    reply: int
    payload: bytes


def split_option_replies(data: bytes) -> tuple[list[OptionReply], bytes]:
    """Decode the option replies at the start of ``data``; return them and the rest.

    The rest is whatever does not start with the option reply magic (the reply to
    NBD_OPT_EXPORT_NAME, which has no header).
    """
    replies = []
    pos = 0
    while len(data) - pos >= 20:
        magic, opt, reply, length = struct.unpack_from(">QIII", data, pos)
        if magic != OPTION_REPLY_MAGIC or len(data) - pos - 20 < length:
            break
        replies.append(OptionReply(opt, reply, bytes(data[pos + 20:pos + 20 + length])))
        pos += 20 + length
    return replies, bytes(data[pos:])


def check_error_message(payload: bytes) -> None:
    """'All error replies MAY have some data set, in which case that data is an error message
    string': a string is UTF-8, has no NUL and is at most 4096 bytes."""
    assert len(payload) <= MAX_STRING, f"error message of {len(payload)} bytes"
    assert b"\0" not in payload, "error message contains NUL"
    payload.decode("utf-8")


def canonical(data: bytes) -> tuple[tuple[OptionReply, ...], bytes]:
    """Server output with the latitude the spec allows taken out, for comparison.

    - error replies: the message text is free, so only (option, type) is compared (after
      checking that the message is a valid string);
    - NBD_REP_META_CONTEXT for SET_META_CONTEXT: the id is "transient" and "opaque", so it
      is blanked (tests check it against ``Negotiated.base_allocation_id`` separately);
    - NBD_REP_INFO: "The server MAY reply to the information requests in any order", so each
      run of consecutive NBD_REP_INFO replies is sorted.
    """
    replies, rest = split_option_replies(data)
    out: list[OptionReply] = []
    run: list[OptionReply] = []

    def flush() -> None:
        out.extend(sorted(run, key=lambda r: (r.option, r.payload)))
        run.clear()

    for reply in replies:
        r = reply
        if r.reply & (1 << 31):
            check_error_message(r.payload)
            r = OptionReply(r.option, r.reply, b"")
        elif r.reply == REP_META_CONTEXT and r.option == OPT_SET_META:
            r = OptionReply(r.option, r.reply, b"\xff\xff\xff\xff" + r.payload[4:])
        if r.reply == REP_INFO:
            run.append(r)
            continue
        flush()
        out.append(r)
    flush()
    return tuple(out), rest


# =========================================================================================
# 3. Vector rows
# =========================================================================================

#: How the test-side "caller" answers the events (a plausible plugin).
EXPORT_SIZE = 1024 * 1024
#: SEND_FLUSH | SEND_FUA | SEND_TRIM; the server adds HAS_FLAGS, and SEND_DF with SR.
EXPORT_FLAGS = (SPEC_TRANSMISSION_FLAGS["NBD_FLAG_SEND_FLUSH"]
                | SPEC_TRANSMISSION_FLAGS["NBD_FLAG_SEND_FUA"]
                | SPEC_TRANSMISSION_FLAGS["NBD_FLAG_SEND_TRIM"])
WIRE_FLAGS = EXPORT_FLAGS | HAS_FLAGS
WIRE_FLAGS_SR = WIRE_FLAGS | SEND_DF
CANONICAL_NAME = b"canonical"
DESCRIPTION = b"a test export"
BLOCK_SIZE = (512, 4096, 32 * 1024 * 1024)
EXPORTS = ((b"", b"the default export"), (b"disk2", b""))


def export_info() -> ExportInfo:
    return ExportInfo(size=EXPORT_SIZE, flags=TransmissionFlag(EXPORT_FLAGS),
                      name=CANONICAL_NAME, description=DESCRIPTION, block_size=BLOCK_SIZE)


NEGOTIATING = "negotiating"
TRANSMISSION = "transmission"
CLOSED = "closed"
VIOLATION = "violation"

DEFAULT_CONFIG = HandshakeConfig()
TLS_ON = HandshakeConfig(tls=TlsMode.ON)
TLS_REQUIRE = HandshakeConfig(tls=TlsMode.REQUIRE)


@dataclass(frozen=True)
class HandshakeVector:
    """One handshake row.

    ``flights`` are the client's bytes after the greeting; a new flight starts after TLS
    came up (the test calls ``tls_established`` on StartTlsRequested).  ``server`` is what the
    server sends after its greeting.  ``refuse`` maps an event's index to the NBD_REP_ERR_*
    the caller answers it with (other events get the plausible answer above).
    """

    name: str
    flights: tuple[bytes, ...]
    events: tuple[Any, ...]
    server: bytes
    outcome: str
    config: HandshakeConfig = DEFAULT_CONFIG
    refuse: tuple[tuple[int, int], ...] = ()
    #: Expected fields of ``Negotiated`` when outcome is TRANSMISSION.
    negotiated: tuple[tuple[str, Any], ...] = ()
    #: proto.md passage the row checks.
    spec: str = ""
    #: Set for a known bug: the row runs as a strict xfail with this reason ("BUG: ...").
    bug: str | None = None
    #: A bug this row found and that has been fixed since (kept as a regression test).
    fixed: str | None = None


def info_event(opt: int, name: bytes, requests: tuple[int, ...]) -> ExportInfoRequested:
    """The event for an NBD_OPT_INFO / NBD_OPT_GO the server accepted for parsing."""
    return ExportInfoRequested(Opt(opt), name, requests)


def _go_ok(opt: int = OPT_GO, *, sr: bool = False, extra: bytes = b"") -> bytes:
    """INFO/GO success: NBD_INFO_EXPORT (+ requested infos) then ACK, no padding."""
    return (rep_info_export(opt, EXPORT_SIZE, WIRE_FLAGS_SR if sr else WIRE_FLAGS)
            + extra + rep(opt, REP_ACK))


def _neg(name: bytes = b"", *, sr: bool = False, base: bool = False) -> tuple[tuple[str, Any], ...]:
    return (("export_name", name), ("size", EXPORT_SIZE),
            ("flags", WIRE_FLAGS_SR if sr else WIRE_FLAGS), ("structured_replies", sr),
            ("base_allocation", base))


CF = client_flags(FIXED)
CF_NZ = client_flags(FIXED | NO_ZEROES)
SR = option(OPT_STRUCTURED_REPLY)
SR_ACK = rep(OPT_STRUCTURED_REPLY, REP_ACK)
BASE_ALLOCATION = b"base:allocation"
GO_EVENT = info_event(OPT_GO, b"", ())
INFO_EVENT = info_event(OPT_INFO, b"", ())
SET_BASE = opt_set_meta(b"", [BASE_ALLOCATION])
SET_BASE_REPLY = rep_meta(OPT_SET_META, 0xFFFFFFFF, BASE_ALLOCATION) + rep(OPT_SET_META, REP_ACK)
LIST_BASE_REPLY = rep_meta(OPT_LIST_META, 0, BASE_ALLOCATION) + rep(OPT_LIST_META, REP_ACK)

_V = HandshakeVector

HANDSHAKE_VECTORS: tuple[HandshakeVector, ...] = (
    # --- client flags ---------------------------------------------------------------------
    _V("cflags-fixed", (CF,), (), b"", NEGOTIATING,
       spec="C: 32 bits, client flags"),
    _V("cflags-fixed-no-zeroes", (CF_NZ,), (), b"", NEGOTIATING),
    _V("cflags-none", (client_flags(0),), (), b"", NEGOTIATING,
       spec="Servers MAY choose to honour fixed newstyle from clients that didn't set this bit"),
    _V("cflags-unknown-bit", (client_flags(1 << 2),), (), b"", VIOLATION,
       spec="the server MUST drop the TCP connection if the client sets an unknown flag"),
    _V("cflags-high-bit", (client_flags(FIXED | 1 << 31),), (), b"", VIOLATION,
       spec="the server MUST drop the TCP connection if the client sets an unknown flag"),
    _V("cflags-no-zeroes-not-offered", (CF_NZ,), (), b"", VIOLATION,
       config=HandshakeConfig(handshake_flags=HandshakeFlag.FIXED_NEWSTYLE),
       spec="NBD_FLAG_C_NO_ZEROES; MUST NOT be set if the server did not set "
            "NBD_FLAG_NO_ZEROES ... the server MUST drop the TCP connection if the client "
            "sets ... a flag that does not match something advertised by the server"),
    _V("cflags-fixed-not-offered", (CF,), (), b"", VIOLATION,
       config=HandshakeConfig(handshake_flags=HandshakeFlag(0)),
       spec="a flag that does not match something advertised by the server"),
    # --- option header --------------------------------------------------------------------
    _V("option-bad-magic", (CF + option(OPT_LIST, magic=NBDMAGIC),), (), b"", VIOLATION,
       spec="C: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')"),
    _V("option-unknown", (CF + option(99, b"some payload") + option(OPT_ABORT),),
       (AbortRequested(),), rep(99, ERR_UNSUP) + rep(OPT_ABORT, REP_ACK), CLOSED,
       spec="The presence of the option length in every option allows the server to skip "
            "any options presented by the client that it does not understand"),
    _V("option-unknown-empty", (CF + option(0x7FFFFFFF),), (), rep(0x7FFFFFFF, ERR_UNSUP),
       NEGOTIATING),
    _V("option-peek-export", (CF + option(OPT_PEEK_EXPORT),), (), rep(OPT_PEEK_EXPORT, ERR_UNSUP),
       NEGOTIATING, spec="NBD_OPT_PEEK_EXPORT (4) ... withdrawn ... not in use"),
    _V("option-extended-headers", (CF + option(OPT_EXTENDED_HEADERS),), (),
       rep(OPT_EXTENDED_HEADERS, REP_ACK), NEGOTIATING,
       spec="NBD_OPT_EXTENDED_HEADERS (11): the server replies with NBD_REP_ACK "
            "(more in test_extended_headers.py)"),
    _V("option-payload-over-64MiB", (CF + option(99, length=64 * 1024 * 1024 + 1),), (), b"",
       VIOLATION,
       spec="if a server believes a client's behaviour constitutes a denial of service, it "
            "MAY initiate a hard disconnect (nbdkit: option payloads over 64 MiB)"),
    _V("option-known-too-big-skipped",
       (CF + option(OPT_GO, bytes(64 * 1024 + 1)) + opt_go(),), (GO_EVENT,),
       rep(OPT_GO, ERR_TOO_BIG) + _go_ok(), TRANSMISSION, negotiated=_neg(),
       spec="NBD_REP_ERR_TOO_BIG (2^31 + 9): The request or the reply is too large to process"),
    _V("option-32-is-allowed", (CF + SR * 31 + opt_go(),), (GO_EVENT,),
       SR_ACK * 31 + _go_ok(sr=True), TRANSMISSION, negotiated=_neg(sr=True),
       spec="nbdkit.md: at most 32 options before an export is chosen"),
    _V("option-33rd-disconnects", (CF + SR * 32 + opt_go(),), (), SR_ACK * 32, VIOLATION,
       spec="if a server believes a client's behaviour constitutes a denial of service, it "
            "MAY initiate a hard disconnect (nbdkit: 'client spent too much time "
            "negotiating without selecting an export')"),
    _V("option-limit-raised-by-list", (CF + option(OPT_LIST) + SR * 32 + opt_go(),),
       (ExportListRequested(), GO_EVENT),
       rep_server(*EXPORTS[0]) + rep_server(*EXPORTS[1]) + rep(OPT_LIST, REP_ACK)
       + SR_ACK * 32 + _go_ok(sr=True), TRANSMISSION, negotiated=_neg(sr=True),
       spec="nbdkit.md: +32 ... for each export listed by NBD_OPT_LIST (nbdkit: +1 each)"),
    _V("option-limit-after-list-exceeded", (CF + option(OPT_LIST) + SR * 33 + opt_go(),),
       (ExportListRequested(),),
       rep_server(*EXPORTS[0]) + rep_server(*EXPORTS[1]) + rep(OPT_LIST, REP_ACK) + SR_ACK * 33,
       VIOLATION),
    # --- NBD_OPT_EXPORT_NAME --------------------------------------------------------------
    _V("export-name-zeroes", (CF + option(OPT_EXPORT_NAME),), (ExportNameRequested(b""),),
       export_name_reply(EXPORT_SIZE, WIRE_FLAGS, zeroes=True), TRANSMISSION,
       negotiated=_neg(),
       spec="S: 64 bits, size ... S: 16 bits, transmission flags; S: 124 bytes, zeroes "
            "(reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)"),
    _V("export-name-no-zeroes", (CF_NZ + option(OPT_EXPORT_NAME, b"disk2"),),
       (ExportNameRequested(b"disk2"),),
       export_name_reply(EXPORT_SIZE, WIRE_FLAGS, zeroes=False), TRANSMISSION,
       negotiated=_neg(b"disk2"),
       spec="If set, the server MUST NOT send the 124 bytes of zeroes when the client ends "
            "negotiation with NBD_OPT_EXPORT_NAME"),
    _V("export-name-zeroes-when-not-offered",
       (CF + option(OPT_EXPORT_NAME),), (ExportNameRequested(b""),),
       export_name_reply(EXPORT_SIZE, WIRE_FLAGS, zeroes=True), TRANSMISSION,
       config=HandshakeConfig(handshake_flags=HandshakeFlag.FIXED_NEWSTYLE), negotiated=_neg(),
       spec="bit 1, NBD_FLAG_NO_ZEROES; if set, and if the client replies with "
            "NBD_FLAG_C_NO_ZEROES ... the server MUST NOT send the 124 bytes of zero"),
    _V("export-name-nonfixed", (client_flags(0) + option(OPT_EXPORT_NAME, b"x"),),
       (ExportNameRequested(b"x"),),
       export_name_reply(EXPORT_SIZE, WIRE_FLAGS, zeroes=True), TRANSMISSION,
       negotiated=_neg(b"x"),
       spec="In non-fixed newstyle only one option can be set (NBD_OPT_EXPORT_NAME)"),
    _V("export-name-after-sr", (CF_NZ + SR + option(OPT_EXPORT_NAME),),
       (ExportNameRequested(b""),),
       SR_ACK + export_name_reply(EXPORT_SIZE, WIRE_FLAGS_SR, zeroes=False), TRANSMISSION,
       negotiated=_neg(sr=True)),
    _V("export-name-too-long", (CF + option(OPT_EXPORT_NAME, b"n" * (MAX_STRING + 1)),), (),
       b"", VIOLATION,
       spec="a string ... MUST be no longer than 4096 bytes; EXPORT_NAME cannot be refused, "
            "so the server terminates the session"),
    _V("nonfixed-other-option", (client_flags(0) + option(OPT_LIST),), (), b"", VIOLATION,
       spec="This is the only valid option in nonfixed newstyle negotiation"),
    # --- NBD_OPT_ABORT --------------------------------------------------------------------
    _V("abort", (CF + option(OPT_ABORT),), (AbortRequested(),), rep(OPT_ABORT, REP_ACK), CLOSED,
       spec="NBD_OPT_ABORT (2): The server MUST reply with NBD_REP_ACK"),
    _V("abort-with-data", (CF + option(OPT_ABORT, b"junk"),), (AbortRequested(),),
       rep(OPT_ABORT, REP_ACK), CLOSED,
       spec="a server SHOULD ignore any data sent by the client rather than rejecting the "
            "request as invalid"),
    _V("abort-with-large-data", (CF + option(OPT_ABORT, bytes(64 * 1024 + 1)),),
       (AbortRequested(),), rep(OPT_ABORT, REP_ACK), CLOSED,
       spec="NBD_OPT_ABORT: The server MUST reply with NBD_REP_ACK. ... a server SHOULD "
            "ignore any data sent by the client rather than rejecting the request as invalid",
       fixed="37d80d8: NBD_OPT_ABORT with more than 64 KiB of data was answered "
             "NBD_REP_ERR_TOO_BIG and negotiation went on, instead of NBD_REP_ACK + close"),
    # --- NBD_OPT_LIST ---------------------------------------------------------------------
    _V("list", (CF + option(OPT_LIST),), (ExportListRequested(),),
       rep_server(*EXPORTS[0]) + rep_server(*EXPORTS[1]) + rep(OPT_LIST, REP_ACK), NEGOTIATING,
       spec="Return zero or more NBD_REP_SERVER replies, one for each export, followed by "
            "NBD_REP_ACK"),
    _V("list-refused", (CF + option(OPT_LIST),), (ExportListRequested(),),
       rep(OPT_LIST, ERR_PLATFORM), NEGOTIATING, refuse=((0, ERR_PLATFORM),)),
    _V("list-with-data", (CF + option(OPT_LIST, b"x"),), (), rep(OPT_LIST, ERR_INVALID),
       NEGOTIATING,
       spec="The client MUST NOT send any additional data with the option, and the server "
            "SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"),
    _V("list-twice", (CF + option(OPT_LIST) * 2,), (ExportListRequested(),),
       rep_server(*EXPORTS[0]) + rep_server(*EXPORTS[1]) + rep(OPT_LIST, REP_ACK)
       + rep(OPT_LIST, ERR_INVALID), NEGOTIATING,
       spec="nbdkit.md: a second LIST on the connection -> ERR_INVALID (proto.md lets LIST "
            "end with an error)"),
    # --- NBD_OPT_INFO / NBD_OPT_GO --------------------------------------------------------
    _V("info-then-go", (CF + opt_info() + opt_go(),), (INFO_EVENT, GO_EVENT),
       _go_ok(OPT_INFO) + _go_ok(), TRANSMISSION, negotiated=_neg(),
       spec="This client MAY issue this command after an NBD_OPT_INFO"),
    _V("info-named", (CF + opt_info(b"disk2"),),
       (info_event(OPT_INFO, b"disk2", ()),), _go_ok(OPT_INFO), NEGOTIATING),
    _V("go-no-padding-with-zeroes", (CF + opt_go(),), (GO_EVENT,), _go_ok(), TRANSMISSION,
       negotiated=_neg(),
       spec="The server MUST NOT send any zero padding bytes after the NBD_REP_ACK data, "
            "whether or not the client negotiated the NBD_FLAG_C_NO_ZEROES flag"),
    _V("go-no-padding-no-zeroes", (CF_NZ + opt_go(),), (GO_EVENT,), _go_ok(), TRANSMISSION,
       negotiated=_neg()),
    _V("go-info-requests",
       (CF + opt_go(b"", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),),
       (info_event(OPT_GO, b"", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)),),
       _go_ok(extra=rep_info_name(OPT_GO, CANONICAL_NAME)
              + rep_info_description(OPT_GO, DESCRIPTION)
              + rep_info_block_size(OPT_GO, *BLOCK_SIZE)),
       TRANSMISSION, negotiated=_neg(),
       spec="NBD_INFO_NAME (1) ... NBD_INFO_DESCRIPTION (2) ... NBD_INFO_BLOCK_SIZE (3): "
            "*length* MUST be 14"),
    _V("info-requests-block-size-only", (CF + opt_info(b"", [INFO_BLOCK_SIZE]),),
       (info_event(OPT_INFO, b"", (INFO_BLOCK_SIZE,)),),
       _go_ok(OPT_INFO, extra=rep_info_block_size(OPT_INFO, *BLOCK_SIZE)), NEGOTIATING),
    _V("go-unknown-info-request-ignored", (CF + opt_go(b"", [0x1234]),),
       (info_event(OPT_GO, b"", (0x1234,)),), _go_ok(), TRANSMISSION,
       negotiated=_neg(),
       spec="The server MUST ignore any information requests it does not understand"),
    _V("go-refused-then-retried", (CF + opt_go(b"nope") + opt_go(),),
       (info_event(OPT_GO, b"nope", ()), GO_EVENT),
       rep(OPT_GO, ERR_UNKNOWN) + _go_ok(), TRANSMISSION, refuse=((0, ERR_UNKNOWN),),
       negotiated=_neg(),
       spec="NBD_REP_ERR_UNKNOWN: The chosen export does not exist on this server. ... The "
            "client MUST NOT send further option requests unless the final reply from the "
            "server indicates an error"),
    _V("go-too-short", (CF + option(OPT_GO, b"\0\0\0\0\0"),), (), rep(OPT_GO, ERR_INVALID),
       NEGOTIATING, spec="32 bits, length of name (unsigned); MUST be no larger than the option "
                         "data length - 6"),
    _V("go-name-length-too-large", (CF + option(OPT_GO, info_payload(b"ab", name_length=3)),),
       (), rep(OPT_GO, ERR_INVALID), NEGOTIATING,
       spec="32 bits, length of name (unsigned); MUST be no larger than the option data "
            "length - 6"),
    _V("go-count-too-large", (CF + option(OPT_GO, info_payload(b"", [1], count=2)),), (),
       rep(OPT_GO, ERR_INVALID), NEGOTIATING),
    _V("go-trailing-garbage", (CF + option(OPT_GO, info_payload(b"", [1]) + b"\0"),), (),
       rep(OPT_GO, ERR_INVALID), NEGOTIATING),
    _V("info-name-with-nul", (CF + opt_info(b"a\0b"),), (), rep(OPT_INFO, ERR_INVALID),
       NEGOTIATING, spec="a string ... MUST NOT contain NUL characters"),
    _V("info-name-too-long", (CF + opt_info(b"n" * (MAX_STRING + 1)),), (),
       rep(OPT_INFO, ERR_INVALID), NEGOTIATING,
       spec="a string ... MUST be no longer than 4096 bytes"),
    _V("info-name-4096-ok", (CF + opt_info(b"n" * MAX_STRING),),
       (info_event(OPT_INFO, b"n" * MAX_STRING, ()),), _go_ok(OPT_INFO), NEGOTIATING),
    # --- NBD_OPT_STRUCTURED_REPLY ---------------------------------------------------------
    _V("structured-reply-then-go", (CF + SR + opt_go(),), (GO_EVENT,), SR_ACK + _go_ok(sr=True),
       TRANSMISSION, negotiated=_neg(sr=True),
       spec="NBD_REP_ACK: Structured replies have been negotiated; NBD_FLAG_SEND_DF: ... MUST "
            "leave this flag clear if structured replies have not been negotiated"),
    _V("structured-reply-with-data", (CF + option(OPT_STRUCTURED_REPLY, b"x") + opt_go(),),
       (GO_EVENT,), rep(OPT_STRUCTURED_REPLY, ERR_INVALID) + _go_ok(), TRANSMISSION,
       negotiated=_neg(),
       spec="The client MUST NOT send any additional data with the option, and the server "
            "SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"),
    _V("structured-reply-disabled", (CF + SR + opt_go(),), (GO_EVENT,),
       rep(OPT_STRUCTURED_REPLY, ERR_UNSUP) + _go_ok(), TRANSMISSION,
       config=HandshakeConfig(structured_replies=False), negotiated=_neg(),
       spec="clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP; in this case, no "
            "structured replies will be sent"),
    # --- NBD_OPT_LIST_META_CONTEXT --------------------------------------------------------
    _V("list-meta-without-sr", (CF + opt_list_meta(),), (), rep(OPT_LIST_META, ERR_INVALID),
       NEGOTIATING,
       spec="This option SHOULD NOT be requested unless structured replies have been "
            "negotiated first. If a client attempts to do so, a server MAY send "
            "NBD_REP_ERR_INVALID"),
    _V("list-meta-all", (CF + SR + opt_list_meta(),), (), SR_ACK + LIST_BASE_REPLY, NEGOTIATING,
       spec="If zero queries are sent, then the server MUST return all the metadata contexts "
            "... The metadata context ID in these replies is reserved and SHOULD be set to "
            "zero"),
    _V("list-meta-base-wildcard", (CF + SR + opt_list_meta(b"", [b"base:"]),), (),
       SR_ACK + LIST_BASE_REPLY, NEGOTIATING,
       spec="base: - ... MUST support this as a wildcard during NBD_OPT_LIST_META_CONTEXT"),
    _V("list-meta-base-allocation", (CF + SR + opt_list_meta(b"", [BASE_ALLOCATION]),), (),
       SR_ACK + LIST_BASE_REPLY, NEGOTIATING),
    _V("list-meta-unknown-namespace", (CF + SR + opt_list_meta(b"", [b"x-foo:bar"]),), (),
       SR_ACK + rep(OPT_LIST_META, REP_ACK), NEGOTIATING,
       spec="the server MUST ignore query strings belonging to an unknown namespace. If none "
            "of the query strings find any metadata contexts, the server MUST send a single "
            "reply of type NBD_REP_ACK"),
    _V("list-meta-unknown-base-leaf", (CF + SR + opt_list_meta(b"", [b"base:nope"]),), (),
       SR_ACK + rep(OPT_LIST_META, REP_ACK), NEGOTIATING,
       spec="If a [leaf-name] requested by the client is not recognized, the server MUST "
            "ignore it rather than report an error"),
    _V("list-meta-query-overruns",
       (CF + SR + option(OPT_LIST_META, meta_payload(b"", [b"base:"])[:-1]),), (),
       SR_ACK + rep(OPT_LIST_META, ERR_INVALID), NEGOTIATING,
       spec="If the option request is syntactically invalid (such as a query length that "
            "would require reading beyond the original length given in the option header), "
            "the server MUST fail the request with NBD_REP_ERR_INVALID"),
    _V("list-meta-name-with-nul", (CF + SR + opt_list_meta(b"a\0", [b"base:"]),), (),
       SR_ACK + rep(OPT_LIST_META, ERR_INVALID), NEGOTIATING,
       spec="String, name of export ... a string ... MUST NOT contain NUL characters"),
    _V("list-meta-count-overruns",
       (CF + SR + option(OPT_LIST_META, struct.pack(">II", 0, 2) + struct.pack(">I", 0)),), (),
       SR_ACK + rep(OPT_LIST_META, ERR_INVALID), NEGOTIATING,
       spec="If the option request is syntactically invalid ... the server MUST fail the "
            "request with NBD_REP_ERR_INVALID"),
    _V("list-meta-trailing-garbage",
       (CF + SR + option(OPT_LIST_META, meta_payload(b"", [b"base:"]) + b"\0"),), (),
       SR_ACK + rep(OPT_LIST_META, ERR_INVALID), NEGOTIATING),
    _V("list-meta-disabled", (CF + SR + opt_list_meta(),), (),
       SR_ACK + rep(OPT_LIST_META, ERR_UNSUP), NEGOTIATING,
       config=HandshakeConfig(meta_contexts=False),
       spec="followed by either a final NBD_REP_ACK on success or by an error (for instance "
            "NBD_REP_ERR_UNSUP if the option is not supported)"),
    # --- NBD_OPT_SET_META_CONTEXT ---------------------------------------------------------
    _V("set-meta-without-sr", (CF + SET_BASE,), (), rep(OPT_SET_META, ERR_INVALID), NEGOTIATING,
       spec="This option MUST NOT be requested unless structured replies have been negotiated "
            "first. If a client attempts to do so, a server SHOULD send NBD_REP_ERR_INVALID"),
    _V("set-meta-base-allocation-then-go", (CF + SR + SET_BASE + opt_go(),), (GO_EVENT,),
       SR_ACK + SET_BASE_REPLY + _go_ok(sr=True), TRANSMISSION,
       negotiated=_neg(sr=True, base=True),
       spec="The server MUST reply with a number of NBD_REP_META_CONTEXT replies, one for each "
            "selected metadata context, each with a unique metadata context ID, followed by "
            "NBD_REP_ACK"),
    _V("set-meta-base-wildcard-ignored", (CF + SR + opt_set_meta(b"", [b"base:"]) + opt_go(),),
       (GO_EVENT,), SR_ACK + rep(OPT_SET_META, REP_ACK) + _go_ok(sr=True), TRANSMISSION,
       negotiated=_neg(sr=True),
       spec="base: - the server MUST ignore this form during NBD_OPT_SET_META_CONTEXT"),
    _V("set-meta-no-queries", (CF + SR + opt_set_meta() + opt_go(),), (GO_EVENT,),
       SR_ACK + rep(OPT_SET_META, REP_ACK) + _go_ok(sr=True), TRANSMISSION,
       negotiated=_neg(sr=True),
       spec="If zero queries are sent, the server MUST select no metadata contexts"),
    _V("set-meta-unknown-ignored", (CF + SR + opt_set_meta(b"", [b"qemu:dirty-bitmap:b"]),),
       (), SR_ACK + rep(OPT_SET_META, REP_ACK), NEGOTIATING),
    _V("set-meta-replaced-by-empty", (CF + SR + SET_BASE + opt_set_meta() + opt_go(),),
       (GO_EVENT,), SR_ACK + SET_BASE_REPLY + rep(OPT_SET_META, REP_ACK) + _go_ok(sr=True),
       TRANSMISSION, negotiated=_neg(sr=True),
       spec="Issuing this command replaces all previously-set metadata contexts"),
    _V("set-meta-replaced-by-failed-set",
       (CF + SR + SET_BASE + option(OPT_SET_META, b"\0\0") + opt_go(),), (GO_EVENT,),
       SR_ACK + SET_BASE_REPLY + rep(OPT_SET_META, ERR_INVALID) + _go_ok(sr=True),
       TRANSMISSION, negotiated=_neg(sr=True, base=False),
       spec="Issuing this command replaces all previously-set metadata contexts (including "
            "when this command fails)",
       fixed="37d80d8: a failed NBD_OPT_SET_META_CONTEXT left the previous selection in "
             "place, so base:allocation was still active after GO"),
    _V("set-meta-other-export-then-go", (CF + SR + opt_set_meta(b"a", [BASE_ALLOCATION])
                                         + opt_go(b"b"),),
       (info_event(OPT_GO, b"b", ()),),
       SR_ACK + SET_BASE_REPLY + _go_ok(sr=True), TRANSMISSION,
       negotiated=_neg(b"b", sr=True, base=False),
       spec="A client MUST NOT send NBD_CMD_BLOCK_STATUS unless ... the final time it was "
            "sent, it referred to the same export name that was ultimately selected"),
    _V("set-meta-other-export-then-export-name",
       (CF_NZ + SR + opt_set_meta(b"a", [BASE_ALLOCATION]) + option(OPT_EXPORT_NAME, b"b"),),
       (ExportNameRequested(b"b"),),
       SR_ACK + SET_BASE_REPLY + export_name_reply(EXPORT_SIZE, WIRE_FLAGS_SR, zeroes=False),
       TRANSMISSION, negotiated=_neg(b"b", sr=True, base=False),
       spec="A client MUST NOT use NBD_CMD_BLOCK_STATUS unless it selected a nonzero number of "
            "metadata contexts during negotiation, and used the same export name for the "
            "subsequent NBD_OPT_GO (or NBD_OPT_EXPORT_NAME). Servers SHOULD reply with "
            "NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without selecting at least "
            "one metadata context",
       fixed="37d80d8: NBD_OPT_EXPORT_NAME kept base:allocation selected for another "
             "export name (NBD_OPT_GO dropped it; nbdkit drops it for both)"),
    _V("set-meta-query-too-long",
       (CF + SR + opt_set_meta(b"", [b"base:" + b"a" * MAX_STRING]),), (),
       SR_ACK + rep(OPT_SET_META, ERR_INVALID), NEGOTIATING,
       spec="The entire name (namespace, colon, and leaf-name) MUST follow the restrictions "
            "for strings (no longer than 4096 bytes)"),
    _V("set-meta-disabled", (CF + SR + SET_BASE,), (),
       SR_ACK + rep(OPT_SET_META, ERR_UNSUP), NEGOTIATING,
       config=HandshakeConfig(meta_contexts=False)),
    # --- NBD_OPT_STARTTLS -----------------------------------------------------------------
    _V("starttls-off", (CF + option(OPT_STARTTLS),), (), rep(OPT_STARTTLS, ERR_POLICY),
       NEGOTIATING,
       spec="NOTLS mode: If the server receives NBD_OPT_STARTTLS it MUST respond with "
            "NBD_REP_ERR_POLICY (if it does not support TLS for policy reasons)"),
    _V("starttls-with-data", (CF + option(OPT_STARTTLS, b"x"),), (),
       rep(OPT_STARTTLS, ERR_INVALID), NEGOTIATING, config=TLS_ON,
       spec="an error reply explicitly permitted by this document (for example, "
            "NBD_REP_ERR_INVALID if the client included data)"),
    _V("starttls-on", (CF + option(OPT_STARTTLS), opt_go()),
       (StartTlsRequested(), GO_EVENT), rep(OPT_STARTTLS, REP_ACK) + _go_ok(), TRANSMISSION,
       config=TLS_ON, negotiated=_neg(),
       spec="If the server receives NBD_OPT_STARTTLS prior to negotiating TLS, it MUST reply "
            "with NBD_REP_ACK"),
    _V("starttls-on-options-before-tls-allowed", (CF + SR + opt_go(),), (GO_EVENT,),
       SR_ACK + _go_ok(sr=True), TRANSMISSION, config=TLS_ON, negotiated=_neg(sr=True),
       spec="SELECTIVETLS: The server does not force the client to upgrade to TLS"),
    _V("starttls-twice", (CF + option(OPT_STARTTLS), option(OPT_STARTTLS)),
       (StartTlsRequested(),), rep(OPT_STARTTLS, REP_ACK) + rep(OPT_STARTTLS, ERR_INVALID),
       NEGOTIATING, config=TLS_REQUIRE,
       spec="If the server receives NBD_OPT_STARTTLS when TLS has already been negotiated, it "
            "MUST reply with NBD_REP_ERR_INVALID"),
    _V("starttls-wipes-structured-reply", (CF + SR + option(OPT_STARTTLS), opt_go()),
       (StartTlsRequested(), GO_EVENT), SR_ACK + rep(OPT_STARTTLS, REP_ACK) + _go_ok(),
       TRANSMISSION, config=TLS_ON, negotiated=_neg(),
       spec="When this command succeeds, the server MUST NOT preserve any negotiation state "
            "(such as a request for NBD_OPT_STRUCTURED_REPLY, or metadata contexts from "
            "NBD_OPT_SET_META_CONTEXT) issued before this command"),
    _V("starttls-wipes-meta-context", (CF + SR + SET_BASE + option(OPT_STARTTLS), SR + opt_go()),
       (StartTlsRequested(), GO_EVENT),
       SR_ACK + SET_BASE_REPLY + rep(OPT_STARTTLS, REP_ACK) + SR_ACK + _go_ok(sr=True),
       TRANSMISSION, config=TLS_ON, negotiated=_neg(sr=True, base=False)),
    # FORCEDTLS (TlsMode.REQUIRE)
    _V("require-list", (CF + option(OPT_LIST),), (), rep(OPT_LIST, ERR_TLS_REQD), NEGOTIATING,
       config=TLS_REQUIRE,
       spec="FORCEDTLS: If the server receives any other option, including NBD_OPT_INFO and "
            "unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been "
            "initiated"),
    _V("require-info", (CF + opt_info(),), (), rep(OPT_INFO, ERR_TLS_REQD), NEGOTIATING,
       config=TLS_REQUIRE),
    _V("require-go", (CF + opt_go(),), (), rep(OPT_GO, ERR_TLS_REQD), NEGOTIATING,
       config=TLS_REQUIRE,
       spec="If the server receives a request to enter transmission mode via NBD_OPT_GO when "
            "TLS has not been initiated, it MUST error with NBD_REP_ERR_TLS_REQD"),
    _V("require-structured-reply", (CF + SR,), (), rep(OPT_STRUCTURED_REPLY, ERR_TLS_REQD),
       NEGOTIATING, config=TLS_REQUIRE),
    _V("require-meta", (CF + opt_list_meta() + SET_BASE,), (),
       rep(OPT_LIST_META, ERR_TLS_REQD) + rep(OPT_SET_META, ERR_TLS_REQD), NEGOTIATING,
       config=TLS_REQUIRE),
    _V("require-invalid-go", (CF + option(OPT_GO, b"\0"),), (), rep(OPT_GO, ERR_TLS_REQD),
       NEGOTIATING, config=TLS_REQUIRE),
    _V("require-unsupported-option", (CF + option(99, b"xy"),), (), rep(99, ERR_TLS_REQD),
       NEGOTIATING, config=TLS_REQUIRE,
       spec="FORCEDTLS: If the server receives any other option, including NBD_OPT_INFO and "
            "unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been "
            "initiated",
       fixed="37d80d8: in TlsMode.REQUIRE an unsupported option was answered "
             "NBD_REP_ERR_UNSUP before TLS (the TLS check ran only for parsed options)"),
    _V("require-oversize-known-option", (CF + option(OPT_GO, bytes(64 * 1024 + 1)),), (),
       rep(OPT_GO, ERR_TLS_REQD), NEGOTIATING, config=TLS_REQUIRE,
       spec="FORCEDTLS: If the server receives any other option ... it MUST reply with "
            "NBD_REP_ERR_TLS_REQD if TLS has not been initiated",
       fixed="37d80d8: in TlsMode.REQUIRE an oversize known option was answered "
             "NBD_REP_ERR_TOO_BIG before TLS instead of NBD_REP_ERR_TLS_REQD"),
    _V("require-abort", (CF + option(OPT_ABORT),), (AbortRequested(),),
       rep(OPT_ABORT, REP_ACK), CLOSED, config=TLS_REQUIRE,
       spec="erroring any NBD options other than NBD_OPT_STARTTLS or NBD_OPT_ABORT with "
            "NBD_REP_ERR_TLS_REQD"),
    _V("require-export-name", (CF + option(OPT_EXPORT_NAME),), (), b"", VIOLATION,
       config=TLS_REQUIRE,
       spec="If the server receives a request to enter transmission mode via "
            "NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this request cannot "
            "error, it MUST terminate the session"),
    _V("require-starttls-then-go", (CF + option(OPT_STARTTLS), SR + SET_BASE + opt_go()),
       (StartTlsRequested(), GO_EVENT),
       rep(OPT_STARTTLS, REP_ACK) + SR_ACK + SET_BASE_REPLY + _go_ok(sr=True), TRANSMISSION,
       config=TLS_REQUIRE, negotiated=_neg(sr=True, base=True),
       spec="The server MUST NOT send NBD_REP_ERR_TLS_REQD in reply to any option if TLS has "
            "already been initiated"),
    _V("require-list-after-tls", (CF + option(OPT_STARTTLS), option(OPT_LIST)),
       (StartTlsRequested(), ExportListRequested()),
       rep(OPT_STARTTLS, REP_ACK) + rep_server(*EXPORTS[0]) + rep_server(*EXPORTS[1])
       + rep(OPT_LIST, REP_ACK), NEGOTIATING, config=TLS_REQUIRE),
    _V("require-export-name-after-tls", (CF_NZ + option(OPT_STARTTLS), option(OPT_EXPORT_NAME)),
       (StartTlsRequested(), ExportNameRequested(b"")),
       rep(OPT_STARTTLS, REP_ACK) + export_name_reply(EXPORT_SIZE, WIRE_FLAGS, zeroes=False),
       TRANSMISSION, config=TLS_REQUIRE, negotiated=_neg()),
)


@dataclass(frozen=True)
class RequestVector:
    """One transmission-phase row: client bytes and the requests they parse to."""

    name: str
    data: bytes
    requests: tuple[Request, ...]
    violation: bool = False
    spec: str = ""


COOKIE = 0x0102030405060708
_R = RequestVector

REQUEST_VECTORS: tuple[RequestVector, ...] = (
    _R("read", request(CMD_READ, cookie=COOKIE, offset=4096, length=512),
       (Request(CMD_READ, 0, COOKIE, 4096, 512, None),),
       spec="C: 32 bits magic, 16 bits command flags, 16 bits type, 64 bits handle, 64 bits "
            "offset, 32 bits length"),
    _R("read-large-no-payload", request(CMD_READ, length=1 << 20) + request(CMD_FLUSH, cookie=2),
       (Request(CMD_READ, 0, 0, 0, 1 << 20, None), Request(CMD_FLUSH, 0, 2, 0, 0, None)),
       spec="(length bytes of data if the request is of type NBD_CMD_WRITE): only WRITE"),
    _R("read-df", request(CMD_READ, flags=FLAG_DF, cookie=1, length=1),
       (Request(CMD_READ, FLAG_DF, 1, 0, 1, None),)),
    _R("write", request(CMD_WRITE, flags=FLAG_FUA, cookie=7, offset=512, data=b"hello"),
       (Request(CMD_WRITE, FLAG_FUA, 7, 512, 5, b"hello"),),
       spec="The client MUST follow the request header with *length* number of bytes"),
    _R("write-zero-length", request(CMD_WRITE, cookie=3) + request(CMD_DISC),
       (Request(CMD_WRITE, 0, 3, 0, 0, b""), Request(CMD_DISC, 0, 0, 0, 0, None)),
       spec="The client SHOULD NOT request a write length of 0; ... the server SHOULD NOT "
            "disconnect"),
    _R("disc", request(CMD_DISC), (Request(CMD_DISC, 0, 0, 0, 0, None),)),
    _R("flush", request(CMD_FLUSH, cookie=9), (Request(CMD_FLUSH, 0, 9, 0, 0, None),)),
    _R("trim-fua", request(CMD_TRIM, flags=FLAG_FUA, offset=1 << 40, length=1 << 31),
       (Request(CMD_TRIM, FLAG_FUA, 0, 1 << 40, 1 << 31, None),)),
    _R("cache", request(CMD_CACHE, offset=8, length=8), (Request(CMD_CACHE, 0, 0, 8, 8, None),)),
    _R("write-zeroes", request(CMD_WRITE_ZEROES, flags=FLAG_NO_HOLE | FLAG_FAST_ZERO, length=9),
       (Request(CMD_WRITE_ZEROES, FLAG_NO_HOLE | FLAG_FAST_ZERO, 0, 0, 9, None),)),
    _R("block-status", request(CMD_BLOCK_STATUS, flags=FLAG_REQ_ONE, length=4096),
       (Request(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 0, 0, 4096, None),)),
    _R("field-maxima", request(CMD_READ, flags=0xFFFF, cookie=2**64 - 1, offset=2**64 - 1,
                               length=2**32 - 1),
       (Request(CMD_READ, 0xFFFF, 2**64 - 1, 2**64 - 1, 2**32 - 1, None),)),
    _R("unknown-command-no-payload", request(99, length=64) + request(CMD_FLUSH),
       (Request(99, 0, 0, 0, 64, None), Request(CMD_FLUSH, 0, 0, 0, 0, None)),
       spec="only NBD_CMD_WRITE carries data; an unknown command is answered EINVAL"),
    _R("resize-is-unknown", request(8, length=4), (Request(8, 0, 0, 0, 4, None),),
       spec="NBD_CMD_RESIZE (8): Defined by the experimental RESIZE extension"),
    _R("pipelined", request(CMD_WRITE, cookie=1, data=b"abc") + request(CMD_READ, cookie=2,
                                                                         length=3)
       + request(CMD_FLUSH, cookie=3) + request(CMD_DISC, cookie=4),
       (Request(CMD_WRITE, 0, 1, 0, 3, b"abc"), Request(CMD_READ, 0, 2, 0, 3, None),
        Request(CMD_FLUSH, 0, 3, 0, 0, None), Request(CMD_DISC, 0, 4, 0, 0, None)),
       spec="Replies need not be sent in the same order as requests (requests may be "
            "pipelined)"),
    _R("bad-magic-zero", bytes(28), (), violation=True,
       spec="C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC); either side MAY initiate a "
            "hard disconnect if it detects a violation"),
    _R("bad-magic-historic", request(CMD_READ, length=1, magic=HISTORIC_REQUEST_MAGIC), (),
       violation=True, spec="0x12560953 - Historic value for NBD_REQUEST_MAGIC"),
    _R("bad-magic-log", request(CMD_READ, length=1, magic=RESERVED_LOG_MAGIC), (),
       violation=True, spec="0x25609514 - ... Never sent from/to a client"),
    _R("bad-magic-little-endian", struct.pack("<I", REQUEST_MAGIC) + bytes(24), (),
       violation=True, spec="always sent in big-endian network byte order"),
    _R("good-then-bad-magic", request(CMD_FLUSH, cookie=5) + request(CMD_READ, magic=0),
       (Request(CMD_FLUSH, 0, 5, 0, 0, None),), violation=True),
    _R("reply-magic-as-request", request(CMD_READ, magic=SIMPLE_REPLY_MAGIC), (),
       violation=True),
)


# =========================================================================================
# 4. Drivers
# =========================================================================================

Chunker = Callable[[bytes], Iterator[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


def chunked(sizes: Iterable[int]) -> Chunker:
    """Cut data into pieces of the given sizes (cycled; the last piece takes the rest)."""
    size_list = [max(1, s) for s in sizes] or [1]

    def cut(data: bytes) -> Iterator[bytes]:
        pos = 0
        i = 0
        while pos < len(data):
            n = size_list[i % len(size_list)]
            yield data[pos:pos + n]
            pos += n
            i += 1

    return cut


CHUNKERS: dict[str, Chunker] = {"whole": whole, "bytewise": bytewise,
                                "chunks-of-7": chunked([7]), "chunks-3-1-11": chunked([3, 1, 11])}


def answer(hs: ServerHandshake, event: Any, refuse: int | None = None) -> bytes:
    """Answer one handshake event as a plausible caller would; returns the reply bytes."""
    if refuse is not None:
        return hs.option_error_reply(Rep(refuse), "refused by the test")
    if isinstance(event, ExportInfoRequested):
        return hs.export_info_reply(export_info())
    if isinstance(event, ExportListRequested):
        return hs.export_list_reply(list(EXPORTS))
    if isinstance(event, ExportNameRequested):
        return hs.export_name_reply(export_info())
    if isinstance(event, StartTlsRequested):
        hs.tls_established()
        return b""
    if isinstance(event, AbortRequested):
        return b""
    raise AssertionError(f"unexpected event {event!r}")


@dataclass
class HandshakeRun:
    hs: ServerHandshake
    events: list[Any] = field(default_factory=list)
    server: bytes = b""
    violation: ProtocolViolation | None = None
    #: Client bytes never fed because the handshake had finished (they belong to the next phase).
    unfed: bytes = b""


def run_handshake(vector: HandshakeVector, chunker: Chunker = whole,
                  trailing: bytes = b"") -> HandshakeRun:
    """Feed a vector's flights (each cut by ``chunker``) and answer every event."""
    hs = ServerHandshake(vector.config)
    run = HandshakeRun(hs)
    out = [hs.data_to_send()]
    assert out[0] == greeting(int(vector.config.handshake_flags)), "greeting"
    out.clear()
    refusals = dict(vector.refuse)
    flights = list(vector.flights)
    flights[-1] += trailing
    try:
        for flight in flights:
            pieces = list(chunker(flight))
            for i, piece in enumerate(pieces):
                if hs.finished:
                    run.unfed += b"".join(pieces[i:])
                    break
                hs.receive_data(piece)
                while True:
                    event = hs.next_event()
                    if event is NEED_DATA:
                        break
                    out.append(hs.data_to_send())
                    out.append(answer(hs, event, refusals.get(len(run.events))))
                    run.events.append(event)
    except ProtocolViolation as err:
        run.violation = err
    out.append(hs.data_to_send())
    run.server = b"".join(out)
    return run


def run_requests(data: bytes, chunker: Chunker = whole) -> tuple[list[Request],
                                                                 ProtocolViolation | None,
                                                                 RequestParser]:
    parser = RequestParser()
    got: list[Request] = []
    try:
        for piece in chunker(data):
            parser.receive_data(piece)
            while True:
                req = parser.next_request()
                if req is NEED_DATA:
                    break
                assert isinstance(req, Request)
                got.append(req)
    except ProtocolViolation as err:
        return got, err, parser
    return got, None, parser


class MiniClient:
    """A tiny NBD client (just enough to negotiate) talking to a ServerHandshake directly.

    Like h11's ConnectionPair: ``send`` feeds the server, answers its events with the
    plausible answers above and returns everything the server sent back.
    """

    def __init__(self, config: HandshakeConfig = DEFAULT_CONFIG,
                 flags: int = FIXED | NO_ZEROES) -> None:
        self.server = ServerHandshake(config)
        hello = self.server.data_to_send()
        magic, opt_magic, self.handshake_flags = struct.unpack(">QQH", hello)
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.events: list[Any] = []
        self.send(client_flags(flags & self.handshake_flags))

    def send(self, data: bytes) -> bytes:
        """Feed raw client bytes; answer events; return all the server sent back."""
        self.server.receive_data(data)
        out = []
        while True:
            event = self.server.next_event()
            if event is NEED_DATA:
                break
            self.events.append(event)
            out.append(self.server.data_to_send())
            out.append(answer(self.server, event))
        out.append(self.server.data_to_send())
        return b"".join(out)

    def option(self, opt: int, payload: bytes = b"") -> list[OptionReply]:
        """Send one option and decode the replies (the client waits for the final one)."""
        replies, rest = split_option_replies(self.send(option(opt, payload)))
        assert rest == b"", rest
        assert replies, "no reply"
        assert all(r.option == opt for r in replies)
        final = replies[-1].reply
        assert final == REP_ACK or final & (1 << 31), replies
        return replies

    def structured_replies(self) -> bool:
        return self.option(OPT_STRUCTURED_REPLY)[-1].reply == REP_ACK

    def set_meta_context(self, name: bytes, queries: Iterable[bytes]) -> dict[bytes, int]:
        replies = self.option(OPT_SET_META, meta_payload(name, queries))
        return {r.payload[4:]: struct.unpack(">I", r.payload[:4])[0]
                for r in replies if r.reply == REP_META_CONTEXT}

    def go(self, name: bytes = b"", requests: Iterable[int] = ()) -> dict[int, bytes]:
        """NBD_OPT_GO; returns the NBD_REP_INFO payloads by information type."""
        replies = self.option(OPT_GO, info_payload(name, requests))
        assert replies[-1].reply == REP_ACK, replies
        infos = {}
        for r in replies[:-1]:
            assert r.reply == REP_INFO
            (kind,) = struct.unpack_from(">H", r.payload)
            infos[kind] = r.payload[2:]
        return infos
