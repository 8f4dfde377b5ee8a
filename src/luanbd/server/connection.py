"""One client connection: drives the handshake machine, then the request loop.

Thread per connection with a blocking socket.  All NBD parsing and encoding is in
``luanbd.protocol``; plugin calls go through ``backend.context.BackendContext``, whose lock
covers the plugin call only, so a client that stays silent in the handshake holds nothing.
"""

from __future__ import annotations

import socket
import ssl
import time
import traceback
from typing import Protocol

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Chain, Context
from luanbd.backend.context import BackendContext
from luanbd.backend.interface import PluginError, StartupError
from luanbd.backend.locks import Locks, RequestLock
from luanbd.config import ServerConfig
from luanbd.protocol.constants import Cmd, CmdFlag, Opt, Rep, TransmissionFlag
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
    oldstyle_greeting,
)
from luanbd.protocol.replies import (
    Buffers,
)
from luanbd.protocol.transmission import Request, RequestParser, Session
from luanbd.server import compiled
from luanbd.server.requests import RequestHandler, StopFlag
from luanbd.server.transport import (
    MAX_BATCH,
    WRITER_THRESHOLD,
    ClientGone,
    Writer,
    send_buffers,
    writable_bytes,
)


class Shared(Protocol):
    """What a connection uses of the state all connections share (server/service.py)."""

    config: ServerConfig
    handshake_config: HandshakeConfig
    ssl_context: ssl.SSLContext | None
    locks: Locks
    chain: Chain
    #: Shutdown has begun: requests get ESHUTDOWN, options NBD_REP_ERR_SHUTDOWN.
    stopping: bool

    def chain_for_connection(self) -> tuple[Chain, RequestLock]: ...

#: Size of the receive buffer: holds many pipelined request headers or a good part of a write.
RECV_SIZE = 256 * 1024
#: The handshake's messages are small: a small buffer keeps idle connections cheap.
HANDSHAKE_RECV_SIZE = 16 * 1024
# Plain ints for the request flags: IntFlag arithmetic costs ~0.6 us per request.
_FUA, _NO_HOLE, _FAST_ZERO, _REQ_ONE = (
    int(f) for f in (CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.FAST_ZERO, CmdFlag.REQ_ONE))
#: With -v, requests that take at least this long (seconds) are logged with their timing.
SLOW_REQUEST = 1.0
_READ, _WRITE = Cmd.READ, Cmd.WRITE

#: What executing a request yields: READ data, BLOCK_STATUS descriptors, or nothing.
_Result = bytes | memoryview | list[tuple[int, int]] | None


class Connection:
    """Serve one client from greeting to close."""

    def __init__(self, service: Shared, sock: socket.socket, number: int, peer: str) -> None:
        self.service = service
        self.sock = sock
        self.number = number
        self.peer = peer
        self.ctx: BackendContext | None = None
        #: This connection's chain: the shared one, or one with its own Lua state.
        self.chain: Chain = service.chain
        self.lock: RequestLock = service.locks.request_lock()
        #: The first layer's context of this connection (set when it starts).
        self.top: Context | None = None
        self._buf = bytearray(HANDSHAKE_RECV_SIZE)
        self._view = memoryview(self._buf)
        #: nbdkit_disconnect was called: the connection ends after the current batch.
        self.closing = False
        #: No new requests (ESHUTDOWN): set by nbdkit_disconnect and by server shutdown.
        self.stop = StopFlag()
        if service.stopping:
            self.stop.set()
        #: time.monotonic() by which the handshake must be over (None: --timeout=0).
        self._deadline: float | None = None
        #: After STARTTLS: self.sock is an SSLSocket (no sendmsg).
        self._tls = False
        self.info = current.ConnectionInfo(peer_name=peer, disconnect=self.disconnect)

    # --- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        current.set_connection(self.info)
        log.debug(f"conn {self.number}: accepted connection from {self.peer or 'local'}")
        try:
            # serialize_requests/parallel scripts get a Lua state of their own per
            # connection (plugin_for_connection); the others share one.
            self.chain, self.lock = self.service.chain_for_connection()
            self.top = self.chain.connect()
            # A client gets --timeout to finish negotiating (greeting to NBD_OPT_GO): one
            # that connects and trickles or says nothing holds a thread, never a lock, and
            # not forever.
            timeout = self.service.config.handshake_timeout
            self.sock.settimeout(timeout)
            # A deadline for the whole handshake, not each read: a client that trickles one
            # byte at a time must not keep its thread for ever.
            self._deadline = time.monotonic() + timeout if timeout else None
            with self.service.locks.connection():
                self._preconnect()
                if self.service.config.oldstyle:
                    self._oldstyle()
                else:
                    self._newstyle()
        except ProtocolViolation as err:
            log.error(f"conn {self.number}: {err}")
        except TimeoutError:
            log.error(f"conn {self.number}: client did not finish the handshake within "
                      f"{self.service.config.handshake_timeout:g} seconds (--timeout)")
        except (ClientGone, ConnectionError):
            log.debug(f"conn {self.number}: client closed the connection")
        except (PluginError, StartupError) as err:
            log.error(str(err))
        except OSError as err:
            log.debug(f"conn {self.number}: {err}")
        except Exception as err:  # a bug of ours: keep serving the other clients
            log.error(f"conn {self.number}: internal error: {err!r}")
            if log.verbose:
                traceback.print_exc()
        finally:
            self._close_export()
            if self.chain.plugin is not self.service.chain.plugin:  # its own Lua state
                self.chain.plugin.cleanup()
                self.chain.plugin.unload()
            current.set_connection(None)
            try:
                self.sock.close()
            except OSError:
                pass
            log.debug(f"conn {self.number}: closed")

    def disconnect(self, force: bool) -> None:
        """nbdkit_disconnect: close at once (force) or after the request being served."""
        self.closing = True
        self.stop.set()
        if force:
            self.shutdown_read()

    def shutdown_read(self) -> None:
        """Wake a recv() blocked on this connection (server shutdown): it sees EOF."""
        try:
            # socket.socket's shutdown, not SSLSocket's (which drops the TLS object under
            # the thread that is reading).
            socket.socket.shutdown(self.sock, socket.SHUT_RD)
        except OSError:
            pass

    def _top(self) -> Context:
        assert self.top is not None, "connection not started"
        return self.top

    # --- I/O ----------------------------------------------------------------------------
    def _recv(self) -> memoryview:
        """Handshake reads (transmission receives straight into the request parser)."""
        self._time_left()
        n = self.sock.recv_into(self._buf)
        if n == 0:
            raise ClientGone
        return self._view[:n]

    def _time_left(self) -> None:
        """Shorten the socket's timeout to what is left of the handshake's deadline."""
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)

    def _send(self, data: bytes) -> None:
        if data:
            self.sock.sendall(data)

    def _send_buffers(self, buffers: Buffers) -> None:
        send_buffers(self.sock, self._tls, buffers)

    # --- handshake ----------------------------------------------------------------------
    def _preconnect(self) -> None:
        with self.lock:
            self._top().preconnect(self.service.config.readonly)

    def _oldstyle(self) -> None:
        info = self._open_export(b"")
        flags = info.flags | TransmissionFlag.HAS_FLAGS
        flags &= ~TransmissionFlag.SEND_DF
        self._send(oldstyle_greeting(info.size, flags))
        self._transmission(Session(b"", info.size, flags, False, None), b"")

    def _newstyle(self) -> None:
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
                log.debug(f"conn {self.number}: client sent NBD_OPT_ABORT")
                return
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
            return
        if log.verbose:
            name = negotiated.export_name.decode("utf-8", "replace")
            log.debug(f"conn {self.number}: export '{name}' size {negotiated.size} "
                      f"flags 0x{int(negotiated.flags):x} ({negotiated.flags}), "
                      f"structured replies {'on' if negotiated.structured_replies else 'off'}, "
                      f"extended headers {'on' if negotiated.extended_headers else 'off'}, "
                      f"base:allocation {'on' if negotiated.base_allocation_id else 'off'}, "
                      f"TLS {'on' if self.info.is_tls else 'off'}")
        self._transmission(Session.from_negotiated(negotiated), negotiated.trailing_data)

    def _start_tls(self) -> None:
        """The server side of the TLS handshake after NBD_OPT_STARTTLS was acknowledged."""
        context = self.service.ssl_context
        if context is None:
            raise ProtocolViolation("STARTTLS accepted without a TLS context")
        self._time_left()
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except ssl.SSLError as err:
            raise ProtocolViolation(f"TLS handshake failed: {err.reason or err}") from None
        self._tls = True
        self.info.is_tls = True
        log.debug(f"conn {self.number}: TLS established ({self.sock.version()})")

    def _list_reply(self, hs: ServerHandshake) -> bytes:
        service = self.service
        try:
            with self.lock:
                exports = self._top().list_exports(service.config.readonly, self.info.is_tls)
        except PluginError as err:
            log.error(str(err))
            return hs.option_error_reply(Rep.ERR_PLATFORM, "could not list exports")
        return hs.export_list_reply([(name, desc or b"") for name, desc in exports])

    def _info_reply(self, hs: ServerHandshake, event: ExportInfoRequested) -> bytes:
        if self.service.stopping:
            return hs.option_error_reply(Rep.ERR_SHUTDOWN, "server is shutting down")
        self._close_export()  # a GO after an INFO opens afresh, as nbdkit does
        try:
            info = self._open_export(event.export_name)
        except PluginError as err:
            log.error(str(err))
            return hs.option_error_reply(Rep.ERR_UNKNOWN, "could not open the export")
        reply = hs.export_info_reply(info)
        if event.option is Opt.INFO:  # INFO only looks: close it again
            self._close_export()
        return reply

    def _open_export(self, name: bytes) -> ExportInfo:
        service = self.service
        readonly = service.config.readonly
        canonical: bytes | None = name
        if name == b"":
            with self.lock:
                canonical = self._top().default_export(readonly, self.info.is_tls)
            if canonical is None:
                raise PluginError("default_export", "the default export is not available")
        self.info.export_name = canonical
        ctx = BackendContext(self._top(), self.lock, readonly=readonly,
                             thread_model=self.chain.thread_model)
        caps = ctx.open()
        self.ctx = ctx
        return ExportInfo(size=caps.size, flags=caps.flags, name=canonical,
                          description=caps.description, block_size=caps.block_size)

    def _close_export(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            ctx.close()

    # --- transmission -------------------------------------------------------------------
    def _transmission(self, session: Session, trailing: bytes) -> None:
        self.sock.settimeout(None)  # an idle client in transmission may stay as long as it likes
        self._deadline = None
        extended = session.extended_headers
        parser = RequestParser(trailing, RECV_SIZE, extended=extended,
                               payload_buffer=writable_bytes)
        ctx = self.ctx
        assert ctx is not None
        handler = RequestHandler(ctx, session, self.number, self.stop)
        handle = handler.handle_request
        recv_into = self.sock.recv_into
        wait_all = 0 if self._tls else socket.MSG_WAITALL
        # Big reply batches go to a writer thread (not with TLS: an SSL object must not be
        # used by two threads at once), so that the kernel's copy of one batch overlaps the
        # Lua work of the next.  Small ones are sent here: a thread hand-off costs more.
        writer = (Writer(self._send_buffers, self.sock, self.shutdown_read,
                               f"conn-{self.number}-writer") if not self._tls else None)
        out: Buffers = []
        size = 0  # READ payload bytes in `out`
        fast = compiled.engage(session, handler, enabled=self.service.config.fastpath,
                               sock=self.sock, tls=self._tls, chain=self.chain, lock=self.lock,
                               stop=self.stop)
        try:
            while True:
                if fast is not None:
                    # The compiled loop serves plain small READs and WRITEs until a request
                    # it leaves to the code below (which is the reference for both).
                    fast.run(parser, writer)
                while True:
                    request = parser.next_request()
                    if request is NEED_DATA:
                        break
                    assert isinstance(request, Request)
                    cmd = request.cmd
                    if cmd is Cmd.DISC:
                        log.debug(f"conn {self.number}: client sent NBD_CMD_DISC")
                        self._send_batch(out, size, writer)
                        if writer is not None:
                            writer.finish()
                        return
                    out += handle(request)
                    if cmd is Cmd.READ:
                        size += request.length
                        if size >= MAX_BATCH:
                            # Send before executing more: a client that pipelines many
                            # big READs and never reads replies is held back by the
                            # socket (backpressure), not buffered in our memory.
                            self._send_batch(out, size, writer)
                            out, size = [], 0
                if out:
                    self._send_batch(out, size, writer)
                    out, size = [], 0
                if self.closing:
                    if writer is not None:
                        writer.finish()
                    return
                # Receive straight into the parser's buffer: a WRITE payload is then copied
                # only once more, into the bytes object the plugin gets.  The rest of a big
                # payload is waited for whole (MSG_WAITALL: one trip through this loop, not
                # one per ~200 KiB the socket hands over; not on TLS, which takes no flags).
                flags = wait_all if parser.receiving_payload else 0
                with parser.get_buffer() as view:
                    n = recv_into(view, 0, flags)
                if n == 0:
                    raise ClientGone
                parser.commit(n)
        finally:
            if writer is not None:
                writer.stop()

    def _send_batch(self, out: Buffers, size: int, writer: Writer | None) -> None:
        """Send ``out``: through the writer when it holds ``size`` >= WRITER_THRESHOLD bytes
        of READ data, else here (under the writer's lock once it has started)."""
        if writer is None:
            self._send_buffers(out)
        elif size >= WRITER_THRESHOLD:
            writer.put(out)
        elif writer.started:
            with writer.lock:
                self._send_buffers(out)
        else:
            self._send_buffers(out)
