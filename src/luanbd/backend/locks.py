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
from types import TracebackType
from typing import Any, Protocol

from luanbd.backend.interface import ThreadModel


class RequestLock(Protocol):
    """What every request lock offers: a context manager, and acquire/release for the
    compiled request loop (server/_fastpath.c), which cannot use ``with``."""

    def acquire(self) -> Any: ...
    def release(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None, /) -> Any: ...


class NoLock:
    """The request lock of the parallel thread model: takes nothing."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None, /) -> None:
        pass


class Locks:
    """The process-wide locks for one plugin's thread model."""

    def __init__(self, model: ThreadModel) -> None:
        self.model = model
        self.connection_lock = threading.Lock()
        self._all_requests = threading.Lock()

    def request_lock(self) -> RequestLock:
        """A lock to hold around each call down the chain of one connection."""
        if self.model <= ThreadModel.SERIALIZE_ALL_REQUESTS:
            return self._all_requests
        if self.model == ThreadModel.SERIALIZE_REQUESTS:
            return threading.Lock()
        return NoLock()

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """Held by a connection from its first open to its end (serialize_connections)."""
        if self.model == ThreadModel.SERIALIZE_CONNECTIONS:
            with self.connection_lock:
                yield
        else:
            yield
