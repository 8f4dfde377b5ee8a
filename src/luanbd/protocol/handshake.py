"""The server side of NBD negotiation as a sans-IO state machine (proto.md "Handshake").

Feed client bytes with :meth:`ServerHandshake.receive_data`, then call
:meth:`ServerHandshake.next_event` until it returns ``NEED_DATA``.  Options the machine can
answer alone (STRUCTURED_REPLY, meta contexts, unknown options, refusals) are answered into
the outbox; the rest come out as events that the caller answers with one of the ``*_reply``
methods.  Whatever is to be sent is collected by :meth:`data_to_send`.  No sockets here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import TypeVar

from luanbd.protocol.constants import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_SKIP_LENGTH,
    MAX_STRING,
    NBDMAGIC,
    NEWSTYLE_GREETING,
    OLDSTYLE_GREETING,
    OLDSTYLE_MAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    ZERO_PAD,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from luanbd.protocol.errors import OptionError, ProtocolViolation


class TlsMode(enum.Enum):
    """The server's TLS policy (nbdkit ``--tls``)."""

    #: STARTTLS is refused with NBD_REP_ERR_POLICY.
    OFF = "off"
    #: STARTTLS is accepted but not required.
    ON = "on"
    #: Every option but STARTTLS and ABORT is refused until TLS is up.
    REQUIRE = "require"


_E = TypeVar("_E")


class _State(enum.Enum):
    #: Greeting sent; waiting for the client's 32-bit flags.
    CLIENT_FLAGS = enum.auto()
    #: Reading option headers and payloads.
    OPTIONS = enum.auto()
    #: An event was returned and the caller has not answered it yet.
    AWAITING_ANSWER = enum.auto()
    #: STARTTLS was acknowledged; waiting for :meth:`tls_established`.
    TLS_HANDSHAKE = enum.auto()
    #: An export was chosen (GO or EXPORT_NAME): hand over to transmission.
    TRANSMISSION = enum.auto()
    #: ABORT, or an export that could not be opened by EXPORT_NAME: close the connection.
    CLOSED = enum.auto()


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`ServerHandshake.next_event` when more client bytes are needed.
NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class HandshakeConfig:
    """What the server offers during negotiation."""

    #: Global flags sent in the greeting (nbdkit ``--mask-handshake`` can clear them).
    handshake_flags: HandshakeFlag = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    #: False refuses NBD_OPT_STRUCTURED_REPLY (nbdkit ``--no-sr``).
    structured_replies: bool = True
    #: False refuses NBD_OPT_EXTENDED_HEADERS (which needs structured replies too).
    extended_headers: bool = True
    #: False refuses meta context negotiation (nbdkit ``--no-mc``).
    meta_contexts: bool = True
    tls: TlsMode = TlsMode.OFF


@dataclass(frozen=True, slots=True)
class ExportNameRequested:
    """NBD_OPT_EXPORT_NAME: answer with :meth:`ServerHandshake.export_name_reply` or close."""

    export_name: bytes


@dataclass(frozen=True, slots=True)
class ExportInfoRequested:
    """NBD_OPT_INFO or NBD_OPT_GO: answer with ``export_info_reply`` or ``option_error_reply``."""

    option: Opt
    export_name: bytes
    info_requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ExportListRequested:
    """NBD_OPT_LIST: answer with ``export_list_reply`` or ``option_error_reply``."""


@dataclass(frozen=True, slots=True)
class StartTlsRequested:
    """NBD_OPT_STARTTLS was acknowledged (already in the outbox): send it, run the TLS
    handshake, then call :meth:`ServerHandshake.tls_established`."""


@dataclass(frozen=True, slots=True)
class AbortRequested:
    """NBD_OPT_ABORT: the ACK is in the outbox; send it and close."""


HandshakeEvent = (
    ExportNameRequested
    | ExportInfoRequested
    | ExportListRequested
    | StartTlsRequested
    | AbortRequested
)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the caller knows about an opened export, to answer INFO/GO/EXPORT_NAME."""

    size: int
    #: Transmission flags from the backend's capabilities; SEND_DF is added here when
    #: structured replies were negotiated, since only then can the server honour DF.
    flags: TransmissionFlag
    #: Canonical name (NBD_INFO_NAME), e.g. what "" resolves to; None if not known.
    name: bytes | None = None
    description: bytes | None = None
    #: (minimum, preferred, maximum) for NBD_INFO_BLOCK_SIZE, or None.
    block_size: tuple[int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of a handshake: everything the transmission phase needs to know."""

    export_name: bytes
    size: int
    flags: TransmissionFlag
    structured_replies: bool
    #: Context id of base:allocation, or None when it was not selected.
    base_allocation_id: int | None
    #: Bytes the client sent after the option that ended negotiation.
    trailing_data: bytes = field(repr=False, default=b"")
    #: NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte requests, extended replies only.
    extended_headers: bool = False


def newstyle_greeting(flags: HandshakeFlag) -> bytes:
    """The first bytes the server sends in (fixed) newstyle negotiation."""
    return NEWSTYLE_GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def oldstyle_greeting(size: int, flags: TransmissionFlag) -> bytes:
    """The whole oldstyle handshake: no options, the export follows directly."""
    return OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, size, int(flags)) + bytes(ZERO_PAD)


def option_reply(option: int, reply: Rep, payload: bytes = b"") -> bytes:
    """One option reply (header plus payload)."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: Options whose payload we buffer and parse; every other option is skipped unread.
_PARSED_OPTIONS = frozenset(
    {Opt.EXPORT_NAME, Opt.LIST, Opt.STARTTLS, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY,
     Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.ABORT, Opt.EXTENDED_HEADERS}
)


class ServerHandshake:
    """Newstyle negotiation, from the client's flags to the chosen export."""

    def __init__(self, config: HandshakeConfig | None = None) -> None:
        self.config = config or HandshakeConfig()
        self._state = _State.CLIENT_FLAGS
        self._buffer = bytearray()
        self._outbox: list[bytes] = [newstyle_greeting(self.config.handshake_flags)]
        self._skip = 0
        self._skip_reply: tuple[int, Rep, str] | None = None
        self._options_seen = 0
        self._option_limit = MAX_OPTIONS
        self.client_flags = ClientFlag(0)
        self.tls_active = False
        self._reset_negotiated_state()
        self._pending: HandshakeEvent | None = None
        self.negotiated: Negotiated | None = None

    def _reset_negotiated_state(self) -> None:
        # Everything here is wiped by STARTTLS (proto.md: state negotiated in plaintext must
        # not survive; nbdkit "Wipe out any cached state"; CVE-2021-3716).
        self.structured_replies = False
        self.extended_headers = False
        self._listed = False
        self._meta_export: bytes | None = None
        self._meta_selected = False

    # --- I/O-facing API ---------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """True once the connection moves to transmission or must close."""
        return self._state in (_State.TRANSMISSION, _State.CLOSED)

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add client bytes to the input buffer."""
        self._buffer += data

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    def next_event(self) -> HandshakeEvent | _NeedData:
        """Process buffered input until an event for the caller or ``NEED_DATA``.

        Raises :class:`ProtocolViolation` when the client must be disconnected.
        """
        while True:
            if self._state is _State.CLIENT_FLAGS:
                if len(self._buffer) < CLIENT_FLAGS.size:
                    return NEED_DATA
                (raw,) = CLIENT_FLAGS.unpack_from(self._buffer)
                del self._buffer[: CLIENT_FLAGS.size]
                self._accept_client_flags(raw)
                continue
            if self._state is _State.OPTIONS:
                event = self._read_option()
                if event is None:
                    continue
                if not isinstance(event, _NeedData) and self._state is _State.OPTIONS:
                    self._state = _State.AWAITING_ANSWER
                    self._pending = event
                return event
            if self._state is _State.AWAITING_ANSWER:
                raise RuntimeError(f"{self._pending} has not been answered")
            return NEED_DATA

    # --- answers to events ------------------------------------------------------------
    def export_name_reply(self, info: ExportInfo) -> bytes:
        """Answer NBD_OPT_EXPORT_NAME with the export: negotiation ends."""
        pending = self._take_pending(ExportNameRequested)
        flags = self._final_flags(info.flags)
        data = EXPORT_NAME_REPLY.pack(info.size, flags)
        if not self.client_flags & ClientFlag.NO_ZEROES:
            data += bytes(ZERO_PAD)
        self._finish(pending.export_name, info.size, flags)
        return data

    def export_info_reply(self, info: ExportInfo) -> bytes:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; GO ends negotiation."""
        pending = self._take_pending(ExportInfoRequested)
        flags = self._final_flags(info.flags)
        parts = [option_reply(pending.option, Rep.INFO,
                              _INFO_EXPORT.pack(Info.EXPORT, info.size, flags))]
        requested = set(pending.info_requests)
        if Info.NAME in requested and info.name is not None:
            parts.append(option_reply(pending.option, Rep.INFO, _U16.pack(Info.NAME) + info.name))
        if Info.DESCRIPTION in requested and info.description is not None:
            parts.append(option_reply(pending.option, Rep.INFO,
                                      _U16.pack(Info.DESCRIPTION) + info.description))
        if Info.BLOCK_SIZE in requested and info.block_size is not None:
            parts.append(option_reply(pending.option, Rep.INFO,
                                      _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *info.block_size)))
        parts.append(option_reply(pending.option, Rep.ACK))
        if pending.option is Opt.GO:
            self._finish(pending.export_name, info.size, flags)
        else:
            self._state = _State.OPTIONS
        return b"".join(parts)

    def export_list_reply(self, exports: list[tuple[bytes, bytes]]) -> bytes:
        """Answer NBD_OPT_LIST with (name, description) pairs."""
        self._take_pending(ExportListRequested)
        parts = [
            option_reply(Opt.LIST, Rep.SERVER, _U32.pack(len(name)) + name + description)
            for name, description in exports
        ]
        parts.append(option_reply(Opt.LIST, Rep.ACK))
        # nbdkit: a client may reasonably ask INFO about each export it was told of.
        self._option_limit += len(exports)
        self._state = _State.OPTIONS
        return b"".join(parts)

    def option_error_reply(self, reply: Rep, message: str = "") -> bytes:
        """Refuse the pending option; negotiation goes on (EXPORT_NAME cannot be refused)."""
        pending = self._pending
        if pending is None or isinstance(pending, ExportNameRequested | StartTlsRequested):
            raise RuntimeError(f"cannot refuse {pending}")
        option = pending.option if isinstance(pending, ExportInfoRequested) else Opt.LIST
        self._pending = None
        self._state = _State.OPTIONS
        return option_reply(option, reply, message.encode())

    @property
    def pending_input(self) -> int:
        """How many received bytes are not processed yet.  Non-zero when STARTTLS is
        acknowledged means the client pipelined plaintext: close instead of starting TLS."""
        return len(self._buffer)

    def tls_established(self) -> None:
        """The TLS handshake after STARTTLS succeeded: start negotiation afresh over TLS."""
        self._take_pending(StartTlsRequested)
        if self._buffer:
            # Bytes sent in plaintext after STARTTLS must not be read as if they were
            # protected by TLS (CVE-2021-3716 class of bugs).
            raise ProtocolViolation("client sent data in plaintext after NBD_OPT_STARTTLS")
        self.tls_active = True
        self._reset_negotiated_state()
        self._state = _State.OPTIONS

    # --- internals --------------------------------------------------------------------
    def _take_pending(self, kind: type[_E]) -> _E:
        pending = self._pending
        if not isinstance(pending, kind):
            raise RuntimeError(f"no pending {kind.__name__} (pending: {pending})")
        self._pending = None
        return pending

    def _final_flags(self, flags: TransmissionFlag) -> TransmissionFlag:
        flags |= TransmissionFlag.HAS_FLAGS
        if self.structured_replies:
            flags |= TransmissionFlag.SEND_DF
        else:
            flags &= ~TransmissionFlag.SEND_DF
        return flags

    def _finish(self, export_name: bytes, size: int, flags: TransmissionFlag) -> None:
        if self._meta_export is not None and self._meta_export != export_name:
            # Contexts were negotiated for another export: they do not apply to this one.
            self._meta_selected = False
        self._state = _State.TRANSMISSION
        self.negotiated = Negotiated(
            export_name=export_name,
            size=size,
            flags=flags,
            structured_replies=self.structured_replies,
            base_allocation_id=BASE_ALLOCATION_ID if self._meta_selected else None,
            trailing_data=bytes(self._buffer),
            extended_headers=self.extended_headers,
        )
        self._buffer.clear()

    def _accept_client_flags(self, raw: int) -> None:
        offered = int(self.config.handshake_flags)
        if raw & ~offered & 0xFFFFFFFF:
            raise ProtocolViolation(f"client requested unexpected flags 0x{raw:x}")
        self.client_flags = ClientFlag(raw)
        self._state = _State.OPTIONS

    def _read_option(self) -> HandshakeEvent | _NeedData | None:
        """Read one option; None means it was answered here (look at the outbox)."""
        if self._skip:
            taken = min(self._skip, len(self._buffer))
            del self._buffer[:taken]
            self._skip -= taken
            if self._skip:
                return NEED_DATA
            assert self._skip_reply is not None
            option, reply, message = self._skip_reply
            self._skip_reply = None
            self._outbox.append(option_reply(option, reply, message.encode()))
            return None
        if len(self._buffer) < OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = OPTION_HEADER.unpack_from(self._buffer)
        if magic != IHAVEOPT:
            raise ProtocolViolation(f"unknown option version (0x{magic:x})")
        fixed = bool(self.client_flags & ClientFlag.FIXED_NEWSTYLE)
        if not fixed and option != Opt.EXPORT_NAME:
            # Without fixed newstyle there is no way to refuse an option: only close.
            raise ProtocolViolation(f"option {_opt_name(option)} needs fixed newstyle")
        if option == Opt.ABORT:
            # Whatever payload follows is irrelevant: we acknowledge and close.
            del self._buffer[:]
            return self._opt_abort(b"")
        tls_required = self.config.tls is TlsMode.REQUIRE and not self.tls_active
        if tls_required and option == Opt.EXPORT_NAME:
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME before TLS was negotiated")
        refusal: tuple[Rep, str] | None = None
        if tls_required and option != Opt.STARTTLS:
            refusal = (Rep.ERR_TLS_REQD, "TLS is required")
        elif option not in _PARSED_OPTIONS:
            refusal = (Rep.ERR_UNSUP, f"unsupported option {_opt_name(option)}")
        elif length > MAX_OPTION_LENGTH:
            if option == Opt.EXPORT_NAME:
                raise ProtocolViolation(f"export name too long ({length} bytes)")
            refusal = (Rep.ERR_TOO_BIG, "option too large")
        if refusal is None and len(self._buffer) < OPTION_HEADER.size + length:
            return NEED_DATA  # counted below once it is complete, however it arrives
        self._options_seen += 1
        if self._options_seen > self._option_limit:
            raise ProtocolViolation("client spent too much time negotiating without "
                                    "selecting an export")
        if refusal is not None:
            if length > MAX_SKIP_LENGTH:
                raise ProtocolViolation(f"option {_opt_name(option)} payload too long "
                                        f"({length} bytes)")
            del self._buffer[: OPTION_HEADER.size]
            self._skip_then_reply(option, length, *refusal)
            return None
        end = OPTION_HEADER.size + length
        payload = bytes(self._buffer[OPTION_HEADER.size:end])
        del self._buffer[:end]
        opt = Opt(option)
        try:
            return self._dispatch[opt](self, payload)
        except OptionError as err:
            self._outbox.append(option_reply(opt, err.reply, str(err).encode()))
            return None

    def _skip_then_reply(self, option: int, length: int, reply: Rep, message: str) -> None:
        self._skip = length
        self._skip_reply = (option, reply, message)
        if not length:
            self._skip = 0
            self._outbox.append(option_reply(option, reply, message.encode()))
            self._skip_reply = None

    # One handler per option (dict dispatch, h2 style); each returns an event or None.
    def _opt_export_name(self, payload: bytes) -> HandshakeEvent | None:
        if len(payload) > MAX_STRING:
            raise ProtocolViolation(f"export name too long ({len(payload)} bytes)")
        if b"\0" in payload:
            # INFO/GO refuse such a name with ERR_INVALID; EXPORT_NAME cannot be refused,
            # only closed (nbdkit would cut the name at the NUL, a different export).
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME: export name contains a NUL byte")
        return ExportNameRequested(payload)

    def _opt_abort(self, payload: bytes) -> HandshakeEvent | None:
        self._outbox.append(option_reply(Opt.ABORT, Rep.ACK))
        self._state = _State.CLOSED
        return AbortRequested()

    def _opt_list(self, payload: bytes) -> HandshakeEvent | None:
        if payload:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_LIST with a payload")
        if self._listed:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_LIST sent twice")
        self._listed = True
        return ExportListRequested()

    def _opt_starttls(self, payload: bytes) -> HandshakeEvent | None:
        if payload:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_STARTTLS with a payload")
        if self.config.tls is TlsMode.OFF:
            raise OptionError(Rep.ERR_POLICY, "TLS is not enabled on this server")
        if self.tls_active:
            raise OptionError(Rep.ERR_INVALID, "TLS is already active")
        self._outbox.append(option_reply(Opt.STARTTLS, Rep.ACK))
        self._state = _State.TLS_HANDSHAKE
        self._pending = StartTlsRequested()
        return StartTlsRequested()

    def _opt_info_or_go(self, opt: Opt, payload: bytes) -> HandshakeEvent | None:
        if len(payload) < 6:
            raise OptionError(Rep.ERR_INVALID, f"{opt}: option too short")
        (name_length,) = _U32.unpack_from(payload)
        if name_length > len(payload) - 6:
            raise OptionError(Rep.ERR_INVALID, f"{opt}: name length is incorrect")
        name = payload[4:4 + name_length]
        (count,) = _U16.unpack_from(payload, 4 + name_length)
        if len(payload) != 6 + name_length + 2 * count:
            raise OptionError(Rep.ERR_INVALID, f"{opt}: length is inconsistent")
        _check_name(name)
        requests = struct.unpack_from(f">{count}H", payload, 6 + name_length)
        return ExportInfoRequested(opt, name, tuple(requests))

    def _opt_info(self, payload: bytes) -> HandshakeEvent | None:
        return self._opt_info_or_go(Opt.INFO, payload)

    def _opt_go(self, payload: bytes) -> HandshakeEvent | None:
        return self._opt_info_or_go(Opt.GO, payload)

    def _opt_structured_reply(self, payload: bytes) -> HandshakeEvent | None:
        if payload:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY with a payload")
        if not self.config.structured_replies:
            raise OptionError(Rep.ERR_UNSUP, "structured replies are disabled")
        if self.extended_headers:
            # Extended headers already imply structured replies; qemu answers this way.
            raise OptionError(Rep.ERR_EXT_HEADER_REQD, "extended headers already negotiated")
        # A repeat is acknowledged again, as nbdkit 1.32 does.
        self.structured_replies = True
        self._outbox.append(option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
        return None

    def _opt_extended_headers(self, payload: bytes) -> HandshakeEvent | None:
        if payload:
            raise OptionError(Rep.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS with a payload")
        if not (self.config.extended_headers and self.config.structured_replies):
            raise OptionError(Rep.ERR_UNSUP, "extended headers are disabled")
        if self.extended_headers:
            raise OptionError(Rep.ERR_INVALID, "extended headers already negotiated")
        # The ACK also turns structured replies on (proto.md); after STRUCTURED_REPLY it is
        # still acknowledged.
        self.extended_headers = True
        self.structured_replies = True
        self._outbox.append(option_reply(Opt.EXTENDED_HEADERS, Rep.ACK))
        return None

    def _meta_queries(self, opt: Opt, payload: bytes) -> tuple[bytes, list[bytes]]:
        if not self.config.meta_contexts:
            raise OptionError(Rep.ERR_UNSUP, "meta contexts are disabled")
        if not self.structured_replies:
            raise OptionError(Rep.ERR_INVALID,
                              f"{opt} needs structured replies to be negotiated first")
        try:
            (name_length,) = _U32.unpack_from(payload)
            name = payload[4:4 + name_length]
            if len(name) != name_length:
                raise struct.error
            offset = 4 + name_length
            (count,) = _U32.unpack_from(payload, offset)
            offset += 4
            queries = []
            for _ in range(count):
                (query_length,) = _U32.unpack_from(payload, offset)
                offset += 4
                query = payload[offset:offset + query_length]
                if len(query) != query_length or query_length > MAX_STRING:
                    raise struct.error
                offset += query_length
                queries.append(query)
        except struct.error:
            raise OptionError(Rep.ERR_INVALID, f"{opt}: invalid payload") from None
        if offset != len(payload):
            raise OptionError(Rep.ERR_INVALID, f"{opt}: length is inconsistent")
        _check_name(name)
        return name, queries

    def _opt_list_meta_context(self, payload: bytes) -> HandshakeEvent | None:
        _, queries = self._meta_queries(Opt.LIST_META_CONTEXT, payload)
        # No query means "list all"; "base:" means every context in the base namespace.
        if not queries or any(q in (b"base:", BASE_ALLOCATION) for q in queries):
            self._outbox.append(option_reply(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT,
                                             _U32.pack(0) + BASE_ALLOCATION))
        self._outbox.append(option_reply(Opt.LIST_META_CONTEXT, Rep.ACK))
        return None

    def _opt_set_meta_context(self, payload: bytes) -> HandshakeEvent | None:
        # Even a refused SET replaces the selection: the client cannot assume that an
        # earlier selection survives a failed one.
        self._meta_selected = False
        name, queries = self._meta_queries(Opt.SET_META_CONTEXT, payload)
        # Each SET replaces the previous selection; unknown contexts are ignored (proto.md).
        self._meta_export = name
        self._meta_selected = BASE_ALLOCATION in queries
        if self._meta_selected:
            self._outbox.append(option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                                             _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION))
        self._outbox.append(option_reply(Opt.SET_META_CONTEXT, Rep.ACK))
        return None

    _dispatch = {
        Opt.EXPORT_NAME: _opt_export_name,
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.INFO: _opt_info,
        Opt.GO: _opt_go,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_list_meta_context,
        Opt.SET_META_CONTEXT: _opt_set_meta_context,
        Opt.EXTENDED_HEADERS: _opt_extended_headers,
    }


def _check_name(name: bytes) -> None:
    if len(name) > MAX_STRING:
        raise OptionError(Rep.ERR_INVALID, f"export name too long ({len(name)} > {MAX_STRING})")
    if b"\0" in name:
        raise OptionError(Rep.ERR_INVALID, "export name contains a NUL byte")


def _opt_name(option: int) -> str:
    try:
        return str(Opt(option))
    except ValueError:
        return f"option {option}"
