"""One client connection: the handshake (server/negotiation.py), then the request loop,
which only reads, hands each request to server/requests.py and writes the replies.

Thread per connection with a blocking socket.  All NBD parsing and encoding is in
``luanbd.protocol``; backend calls go through ``backend.context.BackendContext``, whose lock
covers the call only, so a client that stays silent in the handshake holds nothing.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from typing import Protocol

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Chain
from luanbd.backend.interface import PluginError, StartupError
from luanbd.backend.locks import Locks, RequestLock
from luanbd.protocol.constants import LARGE_DATA, Cmd
from luanbd.protocol.errors import ProtocolViolation
from luanbd.protocol.handshake import NEED_DATA
from luanbd.protocol.replies import Buffers
from luanbd.protocol.transmission import PayloadBuffer, Request, RequestParser, Session
from luanbd.server import compiled
from luanbd.server.negotiation import Negotiation, TlsFailed
from luanbd.server.negotiation import Shared as NegotiationShared
from luanbd.server.readahead import ReadAhead
from luanbd.server.requests import RequestHandler, StopFlag
from luanbd.server.stats import ConnStats, ServerStats
from luanbd.server.transport import (
    MAX_BATCH,
    WRITER_THRESHOLD,
    ClientGone,
    Writer,
    send_buffers,
    writable_bytes,
)


class Shared(NegotiationShared, Protocol):
    """What a connection uses of the state it shares with the other connections of its
    generation (server/generation.py): what negotiation uses, and the chain."""

    @property
    def locks(self) -> Locks: ...
    @property
    def chain(self) -> Chain: ...
    #: --metrics: where connections report (None: metrics are off).
    @property
    def stats(self) -> ServerStats | None: ...

    def chain_for_connection(self) -> tuple[Chain, RequestLock]: ...


#: Size of the receive buffer: holds many pipelined request headers or a good part of a write.
RECV_SIZE = 256 * 1024


class Connection:
    """Serve one client from greeting to close."""

    def __init__(self, service: Shared, sock: socket.socket, number: int, peer: str) -> None:
        self.service = service
        self.sock = sock
        self.number = number
        self.peer = peer
        #: This connection's chain: the shared one, or one with its own Lua state.
        self.chain: Chain = service.chain
        self.lock: RequestLock = service.locks.request_lock()
        self.negotiation: Negotiation | None = None
        #: nbdkit_disconnect was called: the connection ends after the current batch.
        self.closing = False
        #: Make the plugin's payload buffer for a next WRITE of this size now, for the
        #: read-ahead to receive into while this one's holds the request lock (set by
        #: _payload_buffer when the plugin makes them).
        self._prepare_payload: Callable[[int], None] = lambda size: None
        #: No new requests (ESHUTDOWN): set by nbdkit_disconnect and by server shutdown.
        self.stop = StopFlag()
        if service.stopping:
            self.stop.set()
        #: After STARTTLS: self.sock is an SSLSocket (no sendmsg).
        self.tls = False
        self.info = current.ConnectionInfo(peer_name=peer, peer_socket=sock,
                                            disconnect=self.disconnect)
        #: --metrics: this connection's counters (server/stats.py).
        self.stats = ConnStats(number) if service.stats is not None else None

    # --- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        current.set_connection(self.info)
        log.debug(f"conn {self.number}: accepted connection from {self.peer or 'local'}")
        server_stats, stats = self.service.stats, self.stats
        if server_stats is not None and stats is not None:
            server_stats.opened(stats)
        outcome, reported = "error", False
        try:
            # serialize_requests/parallel scripts get a Lua state of their own per
            # connection (plugin_for_connection); the others share one.
            self.chain, self.lock = self.service.chain_for_connection()
            if stats is not None and self.chain.plugin is not self.service.chain.plugin:
                stats.plugin = self.chain.plugin
            # A client gets --timeout to finish negotiating (greeting to NBD_OPT_GO): one
            # that connects and trickles or says nothing holds a thread, never a lock, and
            # not forever.  The clock starts before serialize_connections may make it wait.
            self.negotiation = Negotiation(self.service, self, self.chain,
                                           self.chain.connect(), self.lock)
            with self.service.locks.connection():
                negotiated = self.negotiation.negotiate()
                outcome = "aborted" if negotiated is None else "ok"
                if server_stats is not None:
                    server_stats.handshake(outcome)
                    reported = True
                if negotiated is not None:
                    self._transmission(*negotiated)
        except ProtocolViolation as err:
            outcome = "tls_failed" if isinstance(err, TlsFailed) else "protocol_error"
            log.error(f"conn {self.number}: {err}")
        except TimeoutError:
            outcome = "timeout"
            log.error(f"conn {self.number}: client did not finish the handshake within "
                      f"{self.service.config.handshake_timeout:g} seconds (--timeout)")
        except (ClientGone, ConnectionError):
            outcome = "client_gone"
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
            if server_stats is not None and stats is not None:
                if not reported:  # it ended in the handshake
                    server_stats.handshake(outcome)
                server_stats.closed(stats)
            if self.negotiation is not None:
                self.negotiation.close_export()
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

    def _send_buffers(self, buffers: Buffers) -> None:
        send_buffers(self.sock, self.tls, buffers)

    # --- transmission -------------------------------------------------------------------
    def _transmission(self, session: Session, trailing: bytes) -> None:
        extended = session.extended_headers
        parser = RequestParser(trailing, RECV_SIZE, extended=extended,
                               payload_buffer=self._payload_buffer())
        assert self.negotiation is not None
        ctx = self.negotiation.ctx
        assert ctx is not None
        sparse = self.service.config.sparse_reads
        stats = self.stats
        if stats is not None:
            stats.export_name = session.export_name.decode("utf-8", "replace")
        handler = RequestHandler(ctx, session, self.number, self.stop, sparse_reads=sparse,
                                 stats=stats)
        handle = handler.handle_request
        recv_into = self.sock.recv_into
        wait_all = 0 if self.tls else socket.MSG_WAITALL
        # Big reply batches go to a writer thread (not with TLS: an SSL object must not be
        # used by two threads at once), so that the kernel's copy of one batch overlaps the
        # Lua work of the next.  Small ones are sent here: a thread hand-off costs more.
        writer = (Writer(self._send_buffers, self.sock, self.shutdown_read,
                               f"conn-{self.number}-writer") if not self.tls else None)
        out: Buffers = []
        size = 0  # READ payload bytes in `out`
        fast = compiled.engage(session, handler,
                               enabled=self.service.config.fastpath and not sparse,
                               sock=self.sock, tls=self.tls, chain=self.chain, lock=self.lock,
                               stop=self.stop,
                               stats=stats.cells if stats is not None else None,
                               poll_us=self.service.config.poll_us)

        def receive() -> None:
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

        ahead = (ReadAhead(parser, receive, self.shutdown_read, f"conn-{self.number}-reader",
                           stats.read_aheads if stats is not None else None)
                 if writer is not None else None)
        try:
            while True:
                if fast is not None:
                    # The compiled loop serves plain small READs and WRITEs until a request
                    # it leaves to the code below (which is the reference for both).
                    fast.run(parser, writer)
                ahead_got: Request | None = None  # the request the read-ahead received
                while True:
                    if ahead_got is None:
                        request = parser.next_request()
                        if request is NEED_DATA:
                            break
                        assert isinstance(request, Request)
                    else:
                        request, ahead_got = ahead_got, None
                    cmd = request.cmd
                    if cmd is Cmd.DISC:
                        log.debug(f"conn {self.number}: client sent NBD_CMD_DISC")
                        self._send_batch(out, size, writer)
                        if writer is not None:
                            writer.finish()
                        return
                    if (ahead is not None and cmd is Cmd.WRITE and request.length >= LARGE_DATA
                            and request.data is not None and not parser.buffered
                            and not self.closing and ahead.wanted()):
                        self._prepare_payload(request.length)
                        ahead.start()
                        out += handle(request)
                        ahead.written()
                        # The reply goes out before waiting: the client may want it before
                        # it sends more.
                        self._send_batch(out, size, writer)
                        out, size = [], 0
                        if self.closing:  # nbdkit_disconnect: no next request (stop)
                            break
                        ahead_got = ahead.result()
                        continue
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
                receive()
        finally:
            if ahead is not None:
                ahead.stop()
            if writer is not None:
                writer.stop()

    def _payload_buffer(self) -> PayloadBuffer | None:
        """Where a big WRITE payload is received: into what the plugin makes for it when it
        can (PayloadBuffers: no copy at all), else into a ``bytes`` (one copy, by the
        plugin's own layer)."""
        plugin = self.chain.payload_buffers()
        ordinary = writable_bytes
        if plugin is None or ordinary is None:
            return ordinary
        make, lock = plugin.payload_buffer, self.lock
        spare: list[tuple[bytes, memoryview]] = []  # at most one, made by prepare()

        def payload_buffer(size: int) -> tuple[bytes, memoryview]:
            if spare:
                ahead = spare.pop()
                if len(ahead[0]) == size:
                    return ahead
                # The read-ahead's guess was wrong: no waiting for the lock that this
                # connection's WRITE holds; the plugin copies the bytes (one copy).
                return ordinary(size)
            with lock:
                made = make(size)
            return made if made is not None else ordinary(size)

        def prepare(size: int) -> None:
            if spare and len(spare[0][0]) == size:
                return
            spare.clear()
            with lock:
                made = make(size)
            if made is not None:
                spare.append(made)

        self._prepare_payload = prepare
        return payload_buffer

    def _send_batch(self, out: Buffers, size: int, writer: Writer | None) -> None:
        """Send ``out``: through the writer when it holds ``size`` >= WRITER_THRESHOLD bytes
        of READ data, else here (under the writer's lock once it has started)."""
        if writer is None:
            self._send_buffers(out)
        elif size >= WRITER_THRESHOLD:
            if self.stats is not None:
                self.stats.writer_batches += 1
            writer.put(out)
        elif writer.started:
            with writer.lock:
                self._send_buffers(out)
        else:
            self._send_buffers(out)
