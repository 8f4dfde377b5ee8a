"""One client connection: drives the handshake machine, then the request loop.

Thread per connection with a blocking socket.  All NBD parsing and encoding is in
``luanbd.protocol``; plugin calls go through ``backend.context.BackendContext``, whose lock
covers the plugin call only, so a client that stays silent in the handshake holds nothing.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Chain, Context, bottom
from luanbd.backend.context import BackendContext
from luanbd.backend.interface import FastZeroRefused, PluginError, StartupError
from luanbd.backend.locks import Locks, RequestLock
from luanbd.config import ServerConfig
from luanbd.protocol.constants import MAX_REQUEST_SIZE, Cmd, CmdFlag, Opt, Rep, TransmissionFlag
from luanbd.protocol.errors import ProtocolViolation, RequestError, nbd_error_for
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
    block_status_reply,
    error_chunk_reply,
    ext_block_status_reply,
    ext_error_reply,
    ext_read_reply,
    ext_reply,
    read_chunk_reply,
    simple_reply,
)
from luanbd.protocol.transmission import Request, RequestParser, Session, validate_request
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


try:
    from luanbd.server import _fastpath
except ImportError:  # installed without a C compiler: the Python loop serves everything
    _fastpath = None  # type: ignore[assignment]
FASTPATH_BUILT = _fastpath is not None

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
        #: nbdkit_disconnect was called: no more requests (read by the compiled loop too).
        self.closing = False
        #: time.monotonic() by which the handshake must be over (None: --timeout=0).
        self._deadline: float | None = None
        #: The export takes writes (not -r, can_write): set when transmission starts.
        self._writable = False
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
        self._writable = not session.read_only
        extended = session.extended_headers
        parser = RequestParser(trailing, RECV_SIZE, extended=extended,
                               payload_buffer=writable_bytes)
        handle: Callable[[Request, Session], Buffers] = (
            self._handle_extended if extended else self._handle)
        if log.verbose:
            handle = self._timed(handle)
        recv_into = self.sock.recv_into
        wait_all = 0 if self._tls else socket.MSG_WAITALL
        # Big reply batches go to a writer thread (not with TLS: an SSL object must not be
        # used by two threads at once), so that the kernel's copy of one batch overlaps the
        # Lua work of the next.  Small ones are sent here: a thread hand-off costs more.
        writer = (Writer(self._send_buffers, self.sock, self.shutdown_read,
                               f"conn-{self.number}-writer") if not self._tls else None)
        out: Buffers = []
        size = 0  # READ payload bytes in `out`
        fast = self._fastpath_setup(session)
        try:
            while True:
                if fast is not None and (state := parser.raw_state()) is not None:
                    # The compiled loop serves plain small READs and WRITEs until a request
                    # it leaves to the code below (which is the reference for both).
                    send_lock = writer.lock if writer is not None and writer.started else None
                    pos, end, eof = _fastpath.serve(fast, *state, send_lock)
                    parser.set_raw_state(pos, end)
                    if eof:
                        raise ClientGone
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
                    out += handle(request, session)
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

    def _fastpath_setup(self, session: Session) -> tuple[Any, ...] | None:
        """The compiled loop's view of this connection (luanbd.server._fastpath), or None
        where the Python loop must do everything: TLS (an SSL object), extended headers,
        -v (request timing), a plugin that is not a Lua script."""
        ctx = self.ctx
        if (_fastpath is None or not self.service.config.fastpath or ctx is None or self._tls
                or log.verbose or session.extended_headers):
            return None
        plugin = self.chain.compiled_calls()
        if plugin is None:  # a filter looks at plain requests, or not a Lua plugin
            return None
        call, pread, pwrite, api2 = plugin.fastpath_calls()
        lock = self.lock

        def slow(cmd: int, cookie: int, offset: int, count: int, res: Any) -> Buffers:
            # A result other than success, handled exactly as _handle would.
            is_read = cmd == Cmd.READ
            req = Request(_READ if is_read else _WRITE, 0, cookie, offset, count, None)
            try:
                data = plugin.fastpath_result(is_read, res, count)
            except PluginError as err:
                log.error(str(err))
                return self._error_reply(req, session, self._failed(req, err.errno)[1])
            if not is_read:
                return simple_reply(cookie)
            assert data is not None
            return self._read_reply(cookie, offset, data, session)

        return (self.sock.fileno(), session.size, session.structured_replies, call, pread,
                pwrite if self._writable else None, bottom(ctx.top).handle, api2, lock.acquire,
                lock.release, self,
                self.service, slow)

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

    def _timed(self, handle: Callable[[Request, Session], Buffers],
               ) -> Callable[[Request, Session], Buffers]:
        """With -v: ``handle`` that logs requests slower than SLOW_REQUEST seconds."""

        def timed(req: Request, session: Session) -> Buffers:
            start = time.monotonic()
            try:
                return handle(req, session)
            finally:
                elapsed = time.monotonic() - start
                if elapsed >= SLOW_REQUEST:
                    log.debug(f"conn {self.number}: {req.cmd} offset={req.offset} "
                              f"count={req.length} took {elapsed:.3f} s")

        return timed

    def _run(self, req: Request, session: Session) -> tuple[_Result, int]:
        """Validate and execute one request: (result, 0), or (None, errno) on failure.

        The result is the data of a READ, the extents of a BLOCK_STATUS, else None; the
        reply encoding (classic or extended headers) is the caller's.
        """
        if self.service.stopping or self.closing:
            # proto.md: once shutdown has begun, refuse new requests with ESHUTDOWN.
            return None, errno.ESHUTDOWN
        ctx = self.ctx
        assert ctx is not None
        cmd, flags = req.cmd, req.flags
        try:
            validate_request(req, session)
            if cmd is Cmd.READ:
                return ctx.pread(req.length, req.offset), 0
            if cmd is Cmd.WRITE:
                if req.data is None:  # the parser could not allocate the payload
                    raise RequestError(errno.ENOMEM, f"{cmd}: not enough memory for a "
                                                     f"{req.length}-byte payload")
                ctx.pwrite(req.data, req.offset, bool(flags & _FUA))
            elif cmd is Cmd.FLUSH:
                ctx.flush()
            elif cmd is Cmd.TRIM:
                ctx.trim(req.length, req.offset, bool(flags & _FUA))
            elif cmd is Cmd.WRITE_ZEROES:
                ctx.zero(req.length, req.offset, may_trim=not flags & _NO_HOLE,
                         fua=bool(flags & _FUA), fast=bool(flags & _FAST_ZERO))
            elif cmd is Cmd.CACHE:
                ctx.cache(req.length, req.offset)
            elif cmd is Cmd.BLOCK_STATUS:
                # Extended headers carry 64-bit descriptor lengths ("wide").
                return ctx.extents(req.length, req.offset, bool(flags & _REQ_ONE),
                                   wide=session.extended_headers), 0
            return None, 0
        except RequestError as err:
            log.error(f"invalid request: {err}")
            return self._failed(req, err.errno)
        except FastZeroRefused as err:
            log.debug(str(err))
            return self._failed(req, err.errno)
        except PluginError as err:
            log.error(str(err))
            return self._failed(req, err.errno)

    def _failed(self, req: Request, code: int) -> tuple[None, int]:
        """With -v, a failed request is also logged with its connection and errno (the
        error line itself keeps nbdkit's shape: ``luanbd: error: pread: script.lua:12: ...``)."""
        if log.verbose:
            log.debug(f"conn {self.number}: {req.cmd} cookie={req.cookie} offset={req.offset} "
                      f"count={req.length} failed: {errno.errorcode.get(code, code)}")
        return None, code

    def _handle(self, req: Request, session: Session) -> Buffers:
        """One request, answered with simple or structured replies."""
        cmd = req.cmd
        if (not req.flags and 0 < req.length <= MAX_REQUEST_SIZE
                and req.offset + req.length <= session.size
                and not (self.service.stopping or self.closing)):
            # The most common requests, a plain READ or WRITE in range, in fewer steps (the
            # checks above are validate_request's own fast path); failures end as in _run.
            ctx = self.ctx
            assert ctx is not None
            try:
                if cmd is _READ:
                    return self._read_reply(req.cookie, req.offset,
                                            ctx.pread(req.length, req.offset), session)
                if cmd is _WRITE and req.data is not None and self._writable:
                    ctx.pwrite(req.data, req.offset, False)
                    return simple_reply(req.cookie)
            except PluginError as err:
                log.error(str(err))
                return self._error_reply(req, session, self._failed(req, err.errno)[1])
        result, code = self._run(req, session)
        if code:
            return self._error_reply(req, session, code)
        if req.cmd is Cmd.READ:
            assert isinstance(result, bytes | memoryview)
            return self._read_reply(req.cookie, req.offset, result, session)
        if req.cmd is Cmd.BLOCK_STATUS:
            assert isinstance(result, list) and session.base_allocation_id is not None
            return block_status_reply(req.cookie, session.base_allocation_id, result)
        return simple_reply(req.cookie)

    def _handle_extended(self, req: Request, session: Session) -> Buffers:
        """:meth:`_handle` once extended headers are negotiated: every reply is an extended
        reply chunk echoing the request's offset, block status is BLOCK_STATUS_EXT."""
        result, code = self._run(req, session)
        cookie, offset = req.cookie, req.offset
        if code:
            return ext_error_reply(cookie, offset, nbd_error_for(code, req.flags))
        if req.cmd is Cmd.READ:
            assert isinstance(result, bytes | memoryview)
            return ext_read_reply(cookie, offset, result)
        if req.cmd is Cmd.BLOCK_STATUS:
            assert isinstance(result, list) and session.base_allocation_id is not None
            return ext_block_status_reply(cookie, offset, session.base_allocation_id, result)
        return [ext_reply(cookie, offset)]

    @staticmethod
    def _read_reply(cookie: int, offset: int, data: bytes | memoryview,
                    session: Session) -> Buffers:
        """A successful READ: one OFFSET_DATA chunk, or a simple reply and the data."""
        if session.structured_replies:
            return read_chunk_reply(cookie, offset, data)
        return simple_reply(cookie, data=data)

    @staticmethod
    def _error_reply(req: Request, session: Session, code: int) -> Buffers:
        error = nbd_error_for(code, req.flags)
        if session.structured_replies and req.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
            return error_chunk_reply(req.cookie, error)
        return simple_reply(req.cookie, error)

