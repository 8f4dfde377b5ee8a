"""The handshake phase of one connection: drives the sans-IO handshake machine over the
socket (newstyle with its options, or oldstyle), STARTTLS, and opening the export
(nbdkit ``server/protocol-handshake*.c``).

The connection hands over here first; what it gets back is the negotiated
:class:`~luanbd.protocol.transmission.Session` and the bytes the client already sent for the
transmission phase.  The export stays open on :attr:`Negotiation.ctx` until the connection
closes it.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Protocol

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Chain, Context
from luanbd.backend.context import BackendContext, BlockSizeFailed
from luanbd.backend.interface import PluginError
from luanbd.backend.locks import RequestLock
from luanbd.config import ServerConfig
from luanbd.protocol.constants import Opt, Rep, TransmissionFlag
from luanbd.protocol.errors import ProtocolViolation
from luanbd.protocol.handshake import (
    NEED_DATA,
    AbortRequested,
    ExportInfo,
    ExportInfoRequested,
    ExportListRequested,
    ExportNameRequested,
    HandshakeConfig,
    Negotiated,
    ServerHandshake,
    StartTlsRequested,
    oldstyle_greeting,
)
from luanbd.protocol.transmission import Session
from luanbd.server.transport import ClientGone

#: The handshake's messages are small: a small buffer keeps idle connections cheap.
HANDSHAKE_RECV_SIZE = 16 * 1024


class TlsFailed(ProtocolViolation):
    """The client's TLS handshake failed (counted apart by --metrics)."""


class Shared(Protocol):
    """What negotiation uses of the state its connection shares with the others of its
    generation (server/generation.py)."""

    @property
    def config(self) -> ServerConfig: ...
    @property
    def handshake_config(self) -> HandshakeConfig: ...
    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...
    #: Shutdown has begun: options get NBD_REP_ERR_SHUTDOWN.
    @property
    def stopping(self) -> bool: ...


class Peer(Protocol):
    """What negotiation uses of its connection (server/connection.py)."""

    number: int
    #: Replaced by the SSLSocket after STARTTLS.
    sock: socket.socket
    tls: bool
    info: current.ConnectionInfo


class Negotiation:
    """One connection's handshake, from the greeting to the start of transmission."""

    def __init__(self, service: Shared, conn: Peer, chain: Chain, top: Context,
                 lock: RequestLock) -> None:
        self.service = service
        self.conn = conn
        self.chain = chain
        self.top = top
        self.lock = lock
        #: The open export (after NBD_OPT_GO, EXPORT_NAME or during an INFO).
        self.ctx: BackendContext | None = None
        self._buf = bytearray(HANDSHAKE_RECV_SIZE)
        self._view = memoryview(self._buf)
        # A deadline for the whole handshake, not each read: a client that trickles one
        # byte at a time must not keep its thread for ever (None: --timeout=0).
        timeout = service.config.handshake_timeout
        self._deadline = time.monotonic() + timeout if timeout else None
        conn.sock.settimeout(timeout)

    def negotiate(self) -> tuple[Session, bytes] | None:
        """Run the handshake: the session and the transmission bytes received with it, or
        None when the client ended it (NBD_OPT_ABORT)."""
        with self.lock:
            self.top.preconnect(self.service.config.readonly)
        result = self._oldstyle() if self.service.config.oldstyle else self._newstyle()
        # An idle client in transmission may stay as long as it likes.
        self.conn.sock.settimeout(None)
        return result

    # --- I/O ----------------------------------------------------------------------------
    def _recv(self) -> memoryview:
        self._time_left()
        n = self.conn.sock.recv_into(self._buf)
        if n == 0:
            raise ClientGone
        return self._view[:n]

    def _time_left(self) -> None:
        """Shorten the socket's timeout to what is left of the handshake's deadline."""
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.conn.sock.settimeout(left)

    def _send(self, data: bytes) -> None:
        if data:
            self.conn.sock.sendall(data)

    # --- the two styles -----------------------------------------------------------------
    def _oldstyle(self) -> tuple[Session, bytes]:
        info = self._open_export(b"")
        flags = info.flags | TransmissionFlag.HAS_FLAGS
        flags &= ~TransmissionFlag.SEND_DF
        self._send(oldstyle_greeting(info.size, flags))
        return Session(b"", info.size, flags, False, None), b""

    def _newstyle(self) -> tuple[Session, bytes] | None:
        number = self.conn.number
        hs = ServerHandshake(self.service.handshake_config)
        while not hs.finished:
            event = hs.next_event()
            if event is NEED_DATA:
                self._send(hs.data_to_send())
                hs.receive_data(self._recv())
                continue
            queued = hs.data_to_send()
            if isinstance(event, AbortRequested):
                self._send(queued)
                log.debug(f"conn {number}: client sent NBD_OPT_ABORT")
                return None
            if isinstance(event, ExportListRequested):
                self._send(queued + self._list_reply(hs))
            elif isinstance(event, ExportInfoRequested):
                self._send(queued + self._info_reply(hs, event))
            elif isinstance(event, ExportNameRequested):
                self._send(queued)
                info = self._open_export(event.export_name)
                self._send(hs.export_name_reply(info))
            elif isinstance(event, StartTlsRequested):
                self._send(queued)
                if hs.pending_input:
                    # Never let plaintext sent after STARTTLS count as protected by TLS.
                    raise ProtocolViolation("client sent data in plaintext after "
                                            "NBD_OPT_STARTTLS")
                self._start_tls()
                hs.tls_established()
        self._send(hs.data_to_send())
        negotiated = hs.negotiated
        if negotiated is None:
            return None
        if log.verbose:
            name = negotiated.export_name.decode("utf-8", "replace")
            log.debug(f"conn {number}: export '{name}' size {negotiated.size} "
                      f"flags 0x{int(negotiated.flags):x} ({negotiated.flags}), "
                      f"structured replies {'on' if negotiated.structured_replies else 'off'}, "
                      f"extended headers {'on' if negotiated.extended_headers else 'off'}, "
                      f"metadata contexts {self._contexts(negotiated)}, "
                      f"TLS {'on' if self.conn.tls else 'off'}")
        return Session.from_negotiated(negotiated), negotiated.trailing_data

    @staticmethod
    def _contexts(negotiated: Negotiated) -> str:
        names = [name.decode("utf-8", "replace") for _, name in negotiated.meta_contexts]
        return ", ".join(names) if names else "none"

    def _start_tls(self) -> None:
        """The server side of the TLS handshake after NBD_OPT_STARTTLS was acknowledged."""
        context = self.service.ssl_context
        if context is None:
            raise ProtocolViolation("STARTTLS accepted without a TLS context")
        self._time_left()
        conn = self.conn
        try:
            conn.sock = context.wrap_socket(conn.sock, server_side=True)
        except ssl.SSLError as err:
            raise TlsFailed(f"TLS handshake failed: {err.reason or err}") from None
        conn.tls = True
        conn.info.is_tls = True
        conn.info.peer_socket = conn.sock
        assert isinstance(conn.sock, ssl.SSLSocket)
        log.debug(f"conn {conn.number}: TLS established ({conn.sock.version()})")

    # --- options that reach the backend -------------------------------------------------
    def _list_reply(self, hs: ServerHandshake) -> bytes:
        try:
            with self.lock:
                exports = self.top.list_exports(self.service.config.readonly,
                                                self.conn.info.is_tls)
        except PluginError as err:
            log.error(str(err))
            return hs.option_error_reply(Rep.ERR_PLATFORM, "could not list exports")
        return hs.export_list_reply([(name, desc or b"") for name, desc in exports])

    def _info_reply(self, hs: ServerHandshake, event: ExportInfoRequested) -> bytes:
        if self.service.stopping:
            return hs.option_error_reply(Rep.ERR_SHUTDOWN, "server is shutting down")
        self.close_export()  # a GO after an INFO opens afresh, as nbdkit does
        try:
            info = self._open_export(event.export_name)
        except BlockSizeFailed as err:
            log.error(str(err))
            raise ClientGone from None  # as nbdkit: the connection just ends
        except PluginError as err:
            log.error(str(err))
            return hs.option_error_reply(Rep.ERR_UNKNOWN, "could not open the export")
        reply = hs.export_info_reply(info)
        if event.option is Opt.INFO:  # INFO only looks: close it again
            self.close_export()
        return reply

    def _open_export(self, name: bytes) -> ExportInfo:
        readonly = self.service.config.readonly
        info = self.conn.info
        canonical: bytes | None = name
        if name == b"":
            with self.lock:
                canonical = self.top.default_export(readonly, info.is_tls)
            if canonical is None:
                raise PluginError("default_export", 'default export ("") not permitted', bare=True)
        info.export_name = canonical
        ctx = BackendContext(self.top, self.lock, readonly=readonly,
                             thread_model=self.chain.thread_model)
        caps = ctx.open()
        self.ctx = ctx
        return ExportInfo(size=caps.size, flags=caps.flags, name=canonical,
                          description=caps.description, block_size=caps.block_size)

    def close_export(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            ctx.close()
