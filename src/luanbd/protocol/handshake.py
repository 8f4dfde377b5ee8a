"""The server side of NBD negotiation as a sans-IO state machine (proto.md "Handshake").

Feed client bytes with :meth:`ServerHandshake.receive_data`, then call
:meth:`ServerHandshake.next_event` until it returns ``NEED_DATA``.  Options the machine can
answer alone (STRUCTURED_REPLY, meta contexts, unknown options, refusals) are answered into
the outbox; the rest come out as events that the caller answers with one of the ``*_reply``
methods.  Whatever is to be sent is collected by :meth:`data_to_send`.  No sockets here.

This module holds the states and the server's policy.  The rest is beside it: the events in
:mod:`~luanbd.protocol.events`, the framing of option requests in
:mod:`~luanbd.protocol.option_reader`, the wire format of options and their replies in
:mod:`~luanbd.protocol.options`, that of metadata contexts in
:mod:`~luanbd.protocol.meta_context`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeVar

from luanbd.protocol.constants import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    NBDMAGIC,
    NEWSTYLE_GREETING,
    OLDSTYLE_GREETING,
    OLDSTYLE_MAGIC,
    ZERO_PAD,
    ClientFlag,
    HandshakeFlag,
    Opt,
    Rep,
    TransmissionFlag,
)
from luanbd.protocol.errors import OptionError, ProtocolViolation
from luanbd.protocol.events import (
    NEED_DATA,
    AbortRequested,
    ExportInfoRequested,
    ExportListRequested,
    ExportNameRequested,
    HandshakeEvent,
    StartTlsRequested,
    _NeedData,
)
from luanbd.protocol.meta_context import (
    Selected,
    listed_contexts,
    meta_context_replies,
    parse_meta_context_request,
    selected_contexts,
)
from luanbd.protocol.option_reader import OptionReader
from luanbd.protocol.options import (
    ExportInfo,
    error_reply,
    export_name_answer,
    info_replies,
    option_name,
    option_reply,
    parse_export_name,
    parse_info_request,
    server_replies,
)

# The events, ExportInfo and option_reply were defined here before events.py and
# options.py: importers keep importing them from here (transmission.py and the fuzz
# harnesses take _NeedData too).
__all__ = [
    "NEED_DATA",
    "AbortRequested",
    "ExportInfo",
    "ExportInfoRequested",
    "ExportListRequested",
    "ExportNameRequested",
    "HandshakeConfig",
    "HandshakeEvent",
    "Negotiated",
    "ServerHandshake",
    "StartTlsRequested",
    "TlsMode",
    "_NeedData",
    "newstyle_greeting",
    "oldstyle_greeting",
    "option_reply",
]


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
    #: The metadata contexts served, base:allocation first (the chain may add more).
    meta_context_names: tuple[bytes, ...] = (BASE_ALLOCATION,)


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
    #: Every selected context, (id, name), base:allocation included.
    meta_contexts: Selected = ()


def newstyle_greeting(flags: HandshakeFlag) -> bytes:
    """The first bytes the server sends in (fixed) newstyle negotiation."""
    return NEWSTYLE_GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def oldstyle_greeting(size: int, flags: TransmissionFlag) -> bytes:
    """The whole oldstyle handshake: no options, the export follows directly."""
    return OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, size, int(flags)) + bytes(ZERO_PAD)


#: Options whose payload we buffer and parse; every other option is skipped unread.
_PARSED_OPTIONS = frozenset(
    {Opt.EXPORT_NAME, Opt.LIST, Opt.STARTTLS, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY,
     Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.ABORT, Opt.EXTENDED_HEADERS}
)


def _refuse_unread(option: int, length: int, tls_required: bool) -> tuple[Rep, str] | None:
    """Why an option is refused before its payload is read, or None (ABORT never is)."""
    if tls_required and option == Opt.EXPORT_NAME:
        raise ProtocolViolation("NBD_OPT_EXPORT_NAME before TLS was negotiated")
    if tls_required and option != Opt.STARTTLS:
        return (Rep.ERR_TLS_REQD, "TLS is required")
    if option not in _PARSED_OPTIONS:
        return (Rep.ERR_UNSUP, f"unsupported option {option_name(option)}")
    if length > MAX_OPTION_LENGTH:
        if option == Opt.EXPORT_NAME:
            raise ProtocolViolation(f"export name too long ({length} bytes)")
        return (Rep.ERR_TOO_BIG, "option too large")
    return None


class ServerHandshake:
    """Newstyle negotiation, from the client's flags to the chosen export."""

    def __init__(self, config: HandshakeConfig | None = None) -> None:
        self.config = config or HandshakeConfig()
        self._state = _State.CLIENT_FLAGS
        self._reader = OptionReader(self._refusal)
        #: The client's bytes not processed yet: the reader's own bytearray, so it is only
        #: ever changed in place.
        self._buffer = self._reader.buffer
        self._outbox: list[bytes] = [newstyle_greeting(self.config.handshake_flags)]
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
        self._meta_selected: Selected = ()

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
        data = export_name_answer(info.size, flags,
                                  zeroes=not self.client_flags & ClientFlag.NO_ZEROES)
        self._finish(pending.export_name, info.size, flags)
        return data

    def export_info_reply(self, info: ExportInfo) -> bytes:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; GO ends negotiation."""
        pending = self._take_pending(ExportInfoRequested)
        flags = self._final_flags(info.flags)
        data = info_replies(pending.option, info, flags, pending.info_requests)
        if pending.option is Opt.GO:
            self._finish(pending.export_name, info.size, flags)
        else:
            self._state = _State.OPTIONS
        return data

    def export_list_reply(self, exports: list[tuple[bytes, bytes]]) -> bytes:
        """Answer NBD_OPT_LIST with (name, description) pairs."""
        self._take_pending(ExportListRequested)
        # nbdkit: a client may reasonably ask INFO about each export it was told of.
        self._reader.option_limit += len(exports)
        self._state = _State.OPTIONS
        return server_replies(exports)

    def option_error_reply(self, reply: Rep, message: str = "") -> bytes:
        """Refuse the pending option; negotiation goes on (EXPORT_NAME cannot be refused)."""
        pending = self._pending
        if pending is None or isinstance(pending, ExportNameRequested | StartTlsRequested):
            raise RuntimeError(f"cannot refuse {pending}")
        option = pending.option if isinstance(pending, ExportInfoRequested) else Opt.LIST
        self._pending = None
        self._state = _State.OPTIONS
        return error_reply(option, reply, message)

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
        if self.extended_headers and self.config.meta_contexts:
            flags |= TransmissionFlag.BLOCK_STAT_PAYLOAD
        else:
            flags &= ~TransmissionFlag.BLOCK_STAT_PAYLOAD
        return flags

    def _finish(self, export_name: bytes, size: int, flags: TransmissionFlag) -> None:
        if self._meta_export is not None and self._meta_export != export_name:
            # Contexts were negotiated for another export: they do not apply to this one.
            self._meta_selected = ()
        self._state = _State.TRANSMISSION
        base_id = next((cid for cid, name in self._meta_selected if name == BASE_ALLOCATION),
                       None)
        self.negotiated = Negotiated(
            export_name=export_name,
            size=size,
            flags=flags,
            structured_replies=self.structured_replies,
            base_allocation_id=base_id,
            trailing_data=bytes(self._buffer),
            extended_headers=self.extended_headers,
            meta_contexts=self._meta_selected,
        )
        self._buffer.clear()

    def _accept_client_flags(self, raw: int) -> None:
        offered = int(self.config.handshake_flags)
        if raw & ~offered & 0xFFFFFFFF:
            raise ProtocolViolation(f"client requested unexpected flags 0x{raw:x}")
        self.client_flags = ClientFlag(raw)
        self._reader.fixed_newstyle = bool(self.client_flags & ClientFlag.FIXED_NEWSTYLE)
        self._state = _State.OPTIONS

    def _read_option(self) -> HandshakeEvent | _NeedData | None:
        """Read one option; None means it was answered here (look at the outbox)."""
        read = self._reader.next_option()
        if isinstance(read, _NeedData):
            return read
        if isinstance(read, bytes):  # the refusal of an option skipped unread
            self._outbox.append(read)
            return None
        option, payload = read
        opt = Opt(option)
        try:
            return self._dispatch[opt](self, payload)
        except OptionError as err:
            self._outbox.append(error_reply(opt, err.reply, str(err)))
            return None

    def _refusal(self, option: int, length: int) -> tuple[Rep, str] | None:
        tls_required = self.config.tls is TlsMode.REQUIRE and not self.tls_active
        return _refuse_unread(option, length, tls_required)

    # One handler per option (dict dispatch, h2 style); each returns an event or None.
    def _opt_export_name(self, payload: bytes) -> HandshakeEvent | None:
        return ExportNameRequested(parse_export_name(payload))

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

    def _opt_info(self, payload: bytes) -> HandshakeEvent | None:
        return ExportInfoRequested(Opt.INFO, *parse_info_request(Opt.INFO, payload))

    def _opt_go(self, payload: bytes) -> HandshakeEvent | None:
        return ExportInfoRequested(Opt.GO, *parse_info_request(Opt.GO, payload))

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
        return parse_meta_context_request(opt, payload)

    def _opt_list_meta_context(self, payload: bytes) -> HandshakeEvent | None:
        _, queries = self._meta_queries(Opt.LIST_META_CONTEXT, payload)
        # Ids are only assigned by SET: LIST sends 0.
        listed = listed_contexts(self.config.meta_context_names, queries)
        self._outbox.append(meta_context_replies(Opt.LIST_META_CONTEXT,
                                                 tuple((0, name) for name in listed)))
        return None

    def _opt_set_meta_context(self, payload: bytes) -> HandshakeEvent | None:
        # Even a refused SET replaces the selection: the client cannot assume that an
        # earlier selection survives a failed one.
        self._meta_selected = ()
        name, queries = self._meta_queries(Opt.SET_META_CONTEXT, payload)
        # Each SET replaces the previous selection; unknown contexts are ignored (proto.md).
        self._meta_export = name
        self._meta_selected = selected_contexts(self.config.meta_context_names, queries)
        self._outbox.append(meta_context_replies(Opt.SET_META_CONTEXT, self._meta_selected))
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
