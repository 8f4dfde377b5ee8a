"""Receiving the next request while a big WRITE runs.

One thread per connection receives, parses and executes requests in turn, so while the
plugin works on a 1 MiB WRITE nobody reads the socket: the client fills the socket's
buffer (a few hundred KiB), sleeps, and the next payload then arrives in steps, each a
wake-up of the client.  nbdkit overlaps the two with its worker threads.  Here a helper
thread, started on a connection's first big WRITE, receives and parses the next request
while the request loop runs this one; the loop then takes that request from it.

The parser is used by one thread at a time: by the helper between :meth:`ReadAhead.start`
and :meth:`ReadAhead.result`, by the request loop otherwise.

A client that waits for each reply before it sends the next request (one request in
flight) gains nothing from this and pays a thread hand-off per request, so when nothing
of the next request came while two WRITEs in a row ran, the next 8 big WRITEs are
served without it (then 16, 32, ... up to MAX_SKIP while it keeps gaining nothing), as the
compiled loop's poll backs off.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from luanbd.protocol.handshake import NEED_DATA
from luanbd.protocol.transmission import Request, RequestParser
from luanbd.server.stats import READ_AHEAD_OUTCOMES

# The back-off, the same rule as the compiled loop's poll (_fastpath_poll.c): after MISSES
# WRITEs in a row that gained nothing, skip MIN_SKIP, then twice as many each time.
MISSES = 2
MIN_SKIP = 8
#: The most big WRITEs served without reading ahead after it gained nothing.
MAX_SKIP = 1024
# Positions in the counts (stats.READ_AHEAD_OUTCOMES).
GAINED, MISSED, SKIPPED = (READ_AHEAD_OUTCOMES.index(o) for o in ("gained", "missed", "skipped"))


class ReadAhead:
    """The helper thread of one connection (not with TLS: one SSL object, one thread)."""

    def __init__(self, parser: RequestParser, receive: Callable[[], None],
                 shutdown_read: Callable[[], None], name: str,
                 counts: list[int] | None = None) -> None:
        self._parser = parser
        #: Big WRITEs by outcome, as stats.READ_AHEAD_OUTCOMES (the connection's stats).
        self.counts = counts if counts is not None else [0] * len(READ_AHEAD_OUTCOMES)
        self._receive = receive
        self._shutdown_read = shutdown_read
        self._name = name
        self._jobs: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[Request | BaseException] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: A request is being received for the loop (start was called, result not yet).
        self.pending = False
        #: Bytes of that request have come (set by the helper).
        self.arrived = False
        self._misses = 0
        self._backoff = 0
        self._skip = 0

    def wanted(self) -> bool:
        """Whether to read ahead during this big WRITE (not while backing off)."""
        if self._skip:
            self._skip -= 1
            self.counts[SKIPPED] += 1
            return False
        return True

    def written(self) -> None:
        """The WRITE has run: count whether the next request started coming meanwhile."""
        if self.arrived:
            self.counts[GAINED] += 1
            self._misses = self._backoff = 0
            return
        self.counts[MISSED] += 1
        self._misses += 1
        if self._misses == MISSES:
            self._misses = 0
            self._backoff = self._skip = min(max(MIN_SKIP, 2 * self._backoff), MAX_SKIP)

    def start(self) -> None:
        """Begin receiving the next request (the loop must not touch the parser now)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
            self._thread.start()
        self.pending = True
        self.arrived = False
        self._jobs.put(True)

    def result(self) -> Request:
        """The next request; what receiving or parsing it raised is raised here."""
        self.pending = False
        got = self._results.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def stop(self) -> None:
        """The request loop ended: end the thread (a receive still waiting sees EOF)."""
        if self._thread is None:
            return
        if self.pending:
            self._shutdown_read()
            self.pending = False
            self._results.get()  # ClientGone, or a request nobody will serve now
        self._jobs.put(False)
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        parser, receive = self._parser, self._receive
        while self._jobs.get():
            try:
                while (request := parser.next_request()) is NEED_DATA:
                    receive()
                    self.arrived = True
                assert isinstance(request, Request)
                self._results.put(request)
            except BaseException as err:  # the request loop raises it as its own
                self._results.put(err)
