"""Executing one request of the transmission phase (nbdkit ``server/protocol.c``): validate,
call the backend chain, choose and encode the reply.

:meth:`RequestHandler.handle_request` is the one definition of how a request is served; the
compiled request loop (server/_fastpath.c) hands every result it does not take as success
back to :meth:`RequestHandler.compiled_result`, which ends the same way.
"""

from __future__ import annotations

import errno
import time
from typing import Any, cast

from luanbd import log
from luanbd.backend.context import BackendContext
from luanbd.backend.interface import CompiledCalls, FastZeroRefused, LoggedError, PluginError
from luanbd.protocol.constants import BASE_ALLOCATION, Cmd, CmdFlag
from luanbd.protocol.errors import RequestError, nbd_error_for
from luanbd.protocol.replies import (
    Buffers,
    block_status_reply,
    data_chunk_reply,
    error_chunk_reply,
    ext_block_status_reply,
    ext_data_chunk_reply,
    ext_error_reply,
    ext_hole_chunk_reply,
    ext_read_reply,
    ext_reply,
    hole_chunk_reply,
    read_chunk_reply,
    simple_reply,
)
from luanbd.protocol.transmission import (
    PlainRequests,
    Request,
    Session,
    status_payload_ids,
    validate_request,
)
from luanbd.server.metered import MeteredContext, metered
from luanbd.server.sparse import Pieces, sparse_read
from luanbd.server.stats import ConnStats

# Plain ints for the request flags: IntFlag arithmetic is slow on a per-request path.
_FUA, _NO_HOLE, _FAST_ZERO, _REQ_ONE, _DF = (int(f) for f in (
    CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.FAST_ZERO, CmdFlag.REQ_ONE, CmdFlag.DF))
_READ, _WRITE, _BLOCK_STATUS = Cmd.READ, Cmd.WRITE, Cmd.BLOCK_STATUS
#: With -v, requests that take at least this long (seconds) are logged with their timing.
SLOW_REQUEST = 1.0

#: Each selected metadata context's id and (length, flags) descriptors.
_Status = list[tuple[int, list[tuple[int, int]]]]
#: What executing a request yields: READ data (or its pieces), BLOCK_STATUS descriptors,
#: or nothing.
_Result = bytes | memoryview | Pieces | _Status | None


class StopFlag:
    """Set once a connection may start no new request: server shutdown has begun or
    nbdkit_disconnect was called.  proto.md: requests from then on get ESHUTDOWN.

    The one flag both request loops check before each request: :class:`RequestHandler`
    here, and the compiled loop (server/_fastpath.c), which reads ``cell`` in place (a
    bytearray, so neither loop makes a call to look).
    """

    __slots__ = ("cell",)

    def __init__(self) -> None:
        #: One byte, nonzero once set.
        self.cell = bytearray(1)

    def set(self) -> None:
        self.cell[0] = 1

    def is_set(self) -> bool:
        return bool(self.cell[0])


#: The most of a plugin's error message a client is sent (proto.md allows 4096 bytes).
MAX_ERROR_TEXT = 1024


def client_text(err: PluginError) -> bytes:
    """The message of a failed callback for the structured error chunk: the log line's
    text (``pread: plugin.lua:12: message``), valid UTF-8 (as proto.md requires), cut to
    MAX_ERROR_TEXT bytes at a character boundary.  Only transmission-phase failures get
    here, after any TLS and authentication, so nothing reaches a client it should not."""
    data = str(err).encode("utf-8", "replace")
    if len(data) <= MAX_ERROR_TEXT:
        return data
    return data[:MAX_ERROR_TEXT].decode("utf-8", "ignore").encode("utf-8")


class RequestHandler:
    """Serves the requests of one connection's transmission phase."""

    def __init__(self, ctx: BackendContext, session: Session, number: int,
                 stop: StopFlag, *, sparse_reads: bool = False,
                 stats: ConnStats | None = None) -> None:
        #: --metrics: the data calls are timed (server/metered.py).
        self.ctx = cast(BackendContext, MeteredContext(ctx, stats.cells)) if stats else ctx
        self.session = session
        #: The connection's number, for log lines.
        self.number = number
        #: Once set, new requests get ESHUTDOWN (read in place: ``self._stopped[0]``).
        self.stop = stop
        self._stopped = stop.cell
        self._plain = session.plain
        #: --sparse-reads: READs go through _run, which may answer with holes.
        self._sparse = sparse_reads and session.structured_replies
        if self._sparse:
            self._plain = PlainRequests(0, False)  # admits nothing
        #: The plugin the compiled loop calls, when it serves this connection.
        self.compiled: CompiledCalls | None = None
        if session.extended_headers:
            self.handle_request = self._handle_extended  # type: ignore[method-assign]
        if log.verbose:
            self.handle_request = self._timed(self.handle_request)  # type: ignore[method-assign]
        #: --metrics: failed requests by (command, errno).
        self._errors = stats.errors if stats else None
        if stats is not None:
            self.handle_request = metered(  # type: ignore[method-assign,assignment]
                self.handle_request, stats.cells)

    def handle_request(self, req: Request) -> Buffers:
        """One request, answered with simple or structured replies (extended replies once
        extended headers are negotiated)."""
        if (self._plain.admits(req.cmd, req.flags, req.offset, req.length)
                and not self._stopped[0]):
            # The most common requests skip validate_request (nothing in it applies) and
            # the dispatch below; failures end as in _run.
            ctx = self.ctx
            try:
                if req.cmd is _READ:
                    return self._read_reply(req.cookie, req.offset,
                                            ctx.pread(req.length, req.offset))
                if req.data is not None:
                    ctx.pwrite(req.data, req.offset, False)
                    return simple_reply(req.cookie)
            except PluginError as err:
                return self._error_reply(req, self._plugin_failed(req, err))
        result, code = self._run(req)
        if code:
            return self._error_reply(req, (result, code))
        if req.cmd is _READ:
            if isinstance(result, list):
                pieces, last = cast(Pieces, result), len(result) - 1
                return [buf for i, (at, n, data) in enumerate(pieces) for buf in (
                    hole_chunk_reply(req.cookie, at, n, i == last) if data is None else
                    data_chunk_reply(req.cookie, at, data, i == last))]
            assert isinstance(result, bytes | memoryview)
            return self._read_reply(req.cookie, req.offset, result)
        if req.cmd is _BLOCK_STATUS:
            assert isinstance(result, list)
            status, last = cast(_Status, result), len(result) - 1
            return [buf for i, (cid, descriptors) in enumerate(status)
                    for buf in block_status_reply(req.cookie, cid, descriptors, i == last)]
        return simple_reply(req.cookie)

    def _handle_extended(self, req: Request) -> Buffers:
        """Extended headers: every reply is an extended reply chunk echoing the request's
        offset, block status is BLOCK_STATUS_EXT."""
        result, code = self._run(req)
        cookie, offset = req.cookie, req.offset
        if code:
            return ext_error_reply(cookie, offset, nbd_error_for(code, req.flags),
                                   result if isinstance(result, bytes) else b"")
        if req.cmd is _READ:
            if isinstance(result, list):
                pieces, last = cast(Pieces, result), len(result) - 1
                return [buf for i, (at, n, data) in enumerate(pieces) for buf in (
                    ext_hole_chunk_reply(cookie, offset, at, n, i == last) if data is None
                    else ext_data_chunk_reply(cookie, offset, at, data, i == last))]
            assert isinstance(result, bytes | memoryview)
            return ext_read_reply(cookie, offset, result)
        if req.cmd is _BLOCK_STATUS:
            assert isinstance(result, list)
            status, last = cast(_Status, result), len(result) - 1
            return [buf for i, (cid, descriptors) in enumerate(status)
                    for buf in ext_block_status_reply(cookie, offset, cid, descriptors,
                                                      i == last)]
        return [ext_reply(cookie, offset)]

    def compiled_result(self, cmd: int, cookie: int, offset: int, count: int,
                        res: Any) -> Buffers:
        """A plain request's result that the compiled loop did not take as success,
        answered as :meth:`handle_request` would."""
        plugin = self.compiled
        assert plugin is not None
        is_read = cmd == _READ
        req = Request(_READ if is_read else _WRITE, 0, cookie, offset, count, None)
        try:
            data = plugin.fastpath_result(is_read, res, count)
        except PluginError as err:
            return self._error_reply(req, self._plugin_failed(req, err))
        if not is_read:
            return simple_reply(cookie)
        assert data is not None
        return self._read_reply(cookie, offset, data)

    def _run(self, req: Request) -> tuple[_Result, int]:
        """Validate and execute one request: (result, 0), or (None, errno) on failure.

        The result is the data of a READ, the extents of a BLOCK_STATUS, else None; the
        reply encoding (classic or extended headers) is the caller's.
        """
        if self._stopped[0]:
            if self._errors is not None:
                self._errors[req.cmd, errno.ESHUTDOWN] += 1
            return None, errno.ESHUTDOWN
        ctx, session = self.ctx, self.session
        cmd, flags = req.cmd, req.flags
        try:
            validate_request(req, session)
            if cmd is Cmd.READ:
                if self._sparse and not flags & _DF:
                    return sparse_read(ctx, req.length, req.offset), 0
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
                return self._block_status(req), 0
            return None, 0
        except RequestError as err:
            log.error(f"invalid request: {err}")
            return self._failed(req, err.errno)
        except PluginError as err:
            return self._plugin_failed(req, err)

    def _block_status(self, req: Request) -> _Status:
        """Every selected context's descriptors, all asked before any is sent, so that a
        failure in one is an error reply, not a half-sent answer."""
        ctx, req_one = self.ctx, bool(req.flags & _REQ_ONE)
        # Extended headers carry 64-bit descriptor lengths ("wide").
        wide = self.session.extended_headers
        contexts = self.session.meta_contexts
        if req.data is not None:  # a BLOCK_STATUS payload names some of them
            names = dict(contexts)
            contexts = tuple((cid, names[cid]) for cid in status_payload_ids(req, self.session))
        return [(cid, ctx.extents(req.length, req.offset, req_one, wide=wide)
                 if name == BASE_ALLOCATION else
                 ctx.meta_extents(name, req.length, req.offset, req_one, wide=wide))
                for cid, name in contexts]

    def _plugin_failed(self, req: Request, err: PluginError) -> tuple[bytes, int]:
        """A layer's failure: one error line, except for a refused fast zero (the protocol
        at work) and a LoggedError (its filter logged it already), which are debug lines."""
        if isinstance(err, FastZeroRefused | LoggedError):
            log.debug(str(err))
        else:
            log.error(str(err))
        self._failed(req, err.errno)
        return client_text(err), err.errno

    def _failed(self, req: Request, code: int) -> tuple[None, int]:
        """With -v, a failed request is also logged with its connection and errno (the
        error line itself keeps nbdkit's shape: ``luanbd: error: pread: script.lua:12: ...``)."""
        if self._errors is not None:
            self._errors[req.cmd, code] += 1
        if log.verbose:
            log.debug(f"conn {self.number}: {req.cmd} cookie={req.cookie} offset={req.offset} "
                      f"count={req.length} failed: {errno.errorcode.get(code, code)}")
        return None, code

    def _read_reply(self, cookie: int, offset: int, data: bytes | memoryview) -> Buffers:
        """A successful READ: one OFFSET_DATA chunk, or a simple reply and the data."""
        if self.session.structured_replies:
            return read_chunk_reply(cookie, offset, data)
        return simple_reply(cookie, data=data)

    def _error_reply(self, req: Request, failure: tuple[Any, int]) -> Buffers:
        """The reply to a failed request: a structured error chunk carries the plugin's
        message (client_text), as nbdkit >= 1.42 sends it."""
        text, code = failure
        error = nbd_error_for(code, req.flags)
        if self.session.structured_replies and req.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
            return error_chunk_reply(req.cookie, error,
                                     text if isinstance(text, bytes) else b"")
        return simple_reply(req.cookie, error)

    def _timed(self, handle: Any) -> Any:
        """With -v: ``handle`` that logs requests slower than SLOW_REQUEST seconds."""

        def timed(req: Request) -> Buffers:
            start = time.monotonic()
            try:
                result: Buffers = handle(req)
                return result
            finally:
                elapsed = time.monotonic() - start
                if elapsed >= SLOW_REQUEST:
                    log.debug(f"conn {self.number}: {req.cmd} offset={req.offset} "
                              f"count={req.length} took {elapsed:.3f} s")

        return timed
