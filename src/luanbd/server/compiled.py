"""Engaging the compiled request loop (server/_fastpath.c) on a connection.

The Python loop (server/connection.py ``_transmission`` with server/requests.py) is the
reference and serves every request; where the C module is built and a connection allows it,
the compiled loop serves that connection's plain small READs and WRITEs first and hands
back at the first request it leaves to Python.  Everything that decides whether it may,
and what it is told, is here: :func:`engage` returns a :class:`CompiledLoop` (or None),
whose :meth:`~CompiledLoop.run` the Python loop calls whenever it could take over again.
"""

from __future__ import annotations

import socket
from array import array
from typing import Any

from luanbd import log
from luanbd.backend.chain import Chain, bottom
from luanbd.backend.context_calls import ContextCalls
from luanbd.backend.interface import CompiledCalls
from luanbd.backend.locks import NoLock, RequestLock
from luanbd.protocol.constants import LARGE_DATA
from luanbd.protocol.transmission import PlainRequests, RequestParser, Session
from luanbd.server.requests import RequestHandler, StopFlag
from luanbd.server.stats import BOUNDS_NS, STRIDE
from luanbd.server.transport import MAX_BATCH, ClientGone, Writer

try:
    from luanbd.server import _fastpath
except ImportError:  # installed without a C compiler: the Python loop serves everything
    _fastpath = None  # type: ignore[assignment]
FASTPATH_BUILT = _fastpath is not None

#: The compiled loop serves plain requests below LARGE_DATA: from there on a READ is sent
#: from the Lua string itself (lua/pinning.py) and a WRITE payload is received straight
#: into its bytes object, which only the Python loop does.
MAX_LENGTH = LARGE_DATA - 1


def poll_counts() -> tuple[int, int, int] | None:
    """The compiled loop's waits for a request so far: (hits, misses, skipped) of the poll
    before recv (server/_fastpath_poll.c); None where the loop is not built."""
    return _fastpath.poll_counts() if _fastpath is not None else None


class CompiledLoop:
    """What the compiled loop is told about one connection; serve() reads these fields by
    name each time it is entered (never per request)."""

    __slots__ = ("api2", "call", "fd", "handle", "lock", "max_batch", "plain", "poll_ns",
                 "pread", "pwrite", "slow", "stats", "stats_bounds", "stats_stride", "stop",
                 "structured")

    def __init__(self, *, fd: int, plain: PlainRequests, structured: bool, call: Any,
                 pread: Any, pwrite: Any, handle: Any, api2: bool, lock: RequestLock | None,
                 stop: StopFlag, slow: Any, max_batch: int = MAX_BATCH,
                 stats: array[int] | None = None, poll_us: int = 0) -> None:
        #: The connection's socket (no TLS: the loop uses recv and sendmsg on it).
        self.fd = fd
        #: The requests the loop serves: exactly those ``plain.admits`` takes.
        self.plain = plain
        #: Structured replies were negotiated: a READ is one OFFSET_DATA chunk.
        self.structured = structured
        #: The plugin's CompiledCalls: ``call(pread, handle, count, offset[, 0])`` and
        #: ``call(pwrite, handle, data, offset[, 0])`` (the flags argument when ``api2``).
        self.call = call
        self.pread = pread
        #: None only when ``plain.writable`` is false.
        self.pwrite = pwrite
        self.handle = handle
        self.api2 = api2
        #: Held around each plugin call (its acquire/release); None takes nothing.
        self.lock = lock
        #: Once set, the loop hands the next request back (the Python loop answers
        #: ESHUTDOWN).
        self.stop = stop
        #: ``slow(cmd, cookie, offset, count, result) -> buffers``: the reply to a result
        #: the loop does not take as plain success (RequestHandler.compiled_result).
        self.slow = slow
        #: READ bytes in a batch from which it is sent before more is executed.
        self.max_batch = max_batch
        #: Before sleeping in recv for the next request, poll this long (0: never).
        self.poll_ns = poll_us * 1000
        #: --metrics: the connection's ConnStats.cells, which the loop updates per request
        #: as server/stats.py's record() does (its buckets, its layout); None: nothing.
        self.stats = stats
        self.stats_bounds = BOUNDS_NS
        self.stats_stride = STRIDE

    def run(self, parser: RequestParser, writer: Writer | None) -> None:
        """Serve the plain requests at the front of the parser's buffer, and those that
        follow, until one the Python loop must see (left unparsed in ``parser``).  Raises
        ClientGone when the client closed the connection."""
        state = parser.raw_state()
        if state is None:  # in the middle of a big payload
            return
        # The writer thread's lock while it runs: sends must not interleave with its own.
        send_lock = writer.lock if writer is not None and writer.started else None
        pos, end, eof = _fastpath.serve(self, *state, send_lock)
        parser.set_raw_state(pos, end)
        if eof:
            raise ClientGone


def engage(session: Session, handler: RequestHandler, *, enabled: bool, sock: socket.socket,
           tls: bool, chain: Chain, lock: RequestLock, stop: StopFlag,
           stats: array[int] | None = None, poll_us: int = 0) -> CompiledLoop | None:
    """The compiled loop for this connection, or None where the Python loop must do
    everything: not built or turned off (``enabled``: config.fastpath), TLS (an SSL object),
    extended headers (the loop parses classic headers) or -v (request timing).  Where
    filters look at plain requests (or the plugin is not a Lua script), the loop calls
    the chain's first layer instead of the plugin (backend/context_calls.py)."""
    if not (FASTPATH_BUILT and enabled) or tls or log.verbose or session.extended_headers:
        return None
    plugin: CompiledCalls | None = chain.compiled_calls()
    handle = bottom(handler.ctx.top).handle
    if plugin is None:
        # A filter looks at plain requests: the loop calls the chain's first layer.
        plugin, handle = ContextCalls(handler.ctx.top), None
    call, pread, pwrite, api2 = plugin.fastpath_calls()
    writable = session.plain.writable and pwrite is not None
    # Any result but success is answered by the handler, as the Python loop would.
    handler.compiled = plugin
    return CompiledLoop(
        fd=sock.fileno(),
        plain=PlainRequests(session.size, writable,
                            min(session.plain.max_length, MAX_LENGTH)),
        structured=session.structured_replies, call=call, pread=pread,
        pwrite=pwrite if writable else None, handle=handle,
        api2=api2, lock=None if isinstance(lock, NoLock) else lock, stop=stop,
        slow=handler.compiled_result, stats=stats, poll_us=poll_us)
