"""Thread-model locks (nbdkit ``server/locks.c``).

Lock order, outermost first: ``connection_lock`` (held for a whole connection under
serialize_connections), then the request lock around one plugin call.  The locks never
cover socket I/O or a handshake waiting for the client (nbdkit holds its request lock
through the whole handshake, so one silent client stalls everybody; we do not).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

from luanbd.backend.interface import ThreadModel


class Locks:
    """The process-wide locks for one plugin's thread model."""

    def __init__(self, model: ThreadModel) -> None:
        self.model = model
        self.connection_lock = threading.Lock()
        self._all_requests = threading.Lock()

    def request_lock(self) -> AbstractContextManager[object]:
        """A lock to hold around each plugin call of one connection."""
        if self.model <= ThreadModel.SERIALIZE_ALL_REQUESTS:
            return self._all_requests
        if self.model == ThreadModel.SERIALIZE_REQUESTS:
            return threading.Lock()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """Held by a connection from its first open to its end (serialize_connections)."""
        if self.model == ThreadModel.SERIALIZE_CONNECTIONS:
            with self.connection_lock:
                yield
        else:
            yield
