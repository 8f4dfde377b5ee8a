"""Service: the state every connection shares (config, shutdown flag, the generation of the
chain new connections get)."""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Chain
from luanbd.backend.interface import Plugin
from luanbd.config import ServerConfig
from luanbd.protocol.constants import BASE_ALLOCATION
from luanbd.server.connection import Connection
from luanbd.server.generation import Generation
from luanbd.server.stats import ServerStats

#: After SIGTERM, how long connected clients get to notice ESHUTDOWN and disconnect by
#: themselves before they are cut off (nbdkit waits for them forever).
SHUTDOWN_GRACE = 3.0
#: Refused connections (over --limit) are logged at most once per this many seconds.
REFUSED_LOG_INTERVAL = 10.0


class Service:
    """Accepted sockets become :class:`Connection` threads; shutdown stops them in order."""

    def __init__(self, chain: Chain, config: ServerConfig,
                 plugin_factory: Callable[[], Plugin] | None = None,
                 meta_contexts: tuple[bytes, ...] = (BASE_ALLOCATION,)) -> None:
        self.config = config
        #: Set (by lifecycle) when --tls is on or require: wraps a socket after STARTTLS.
        self.ssl_context: ssl.SSLContext | None = None
        #: Set once shutdown has begun: new connections are refused, options get
        #: NBD_REP_ERR_SHUTDOWN, and each connection's stop flag is set (its requests get
        #: ESHUTDOWN).
        self.stopping = False
        #: Set when the process should stop (signal, nbdkit.shutdown(), --run ended).
        self.stop = threading.Event()
        # A self-pipe wakes wait_for_stop() with no polling; signals write to it too.
        self._wake_r, self.wakeup_fd = os.pipe()
        os.set_blocking(self.wakeup_fd, False)
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._connections: dict[Connection, tuple[threading.Thread, Generation]] = {}
        self._refused = 0
        #: --metrics: what connections count (server/stats.py), or None.
        self.stats = ServerStats() if config.metrics is not None else None
        self._refused_log = log.Throttle(REFUSED_LOG_INTERVAL)
        #: The generation new connections get (server/generation.py); a reload replaces it.
        self.generation = Generation(self, 1, chain, plugin_factory, meta_contexts)
        #: Retired generations whose connections are still open.
        self._retired: list[Generation] = []
        #: Set by SIGHUP: wait_for_stop() calls ``on_reload`` in the main thread.
        self.reload_requested = False
        self.on_reload: Callable[[], None] | None = None

    @property
    def chain(self) -> Chain:
        """The chain new connections are served by."""
        return self.generation.chain

    def install(self, chain: Chain, plugin_factory: Callable[[], Plugin] | None,
                meta_contexts: tuple[bytes, ...]) -> Generation:
        """A reload: new connections get ``chain``; the old generation serves the
        connections it has until they close, and is finished after the last one."""
        with self._lock:
            old = self.generation
            self.generation = Generation(self, old.number + 1, chain, plugin_factory,
                                         meta_contexts)
            self._retired.append(old)
        self.finish_retired()
        return self.generation

    def generations(self) -> tuple[int, int]:
        """The current generation's number and how many retired ones still serve."""
        with self._lock:
            return self.generation.number, len(self._retired)

    def finish_retired(self) -> None:
        """Clean up and unload every retired generation without a connection left (each
        leaves the list here, so it is finished once)."""
        with self._lock:
            done = [g for g in self._retired if g.connections == 0]
            self._retired = [g for g in self._retired if g.connections]
        for generation in done:
            log.debug(f"generation {generation.number}: last connection closed, unloading")
            generation.finish()

    def finish_all(self) -> None:
        """At exit (Server.stop, once), with every connection closed: the retired
        generations, then the current one."""
        self.finish_retired()
        self.generation.finish()

    def handle(self, sock: socket.socket, peer: str) -> None:
        """Serve an accepted socket in a new thread."""
        if self.stopping:
            sock.close()
            return
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are batched already; Nagle would only add latency to each batch.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        limit = self.config.connection_limit
        with self._lock:
            if limit and len(self._connections) >= limit:
                self._refuse(sock, peer, limit)
                return
            generation = self.generation
            generation.connections += 1
            conn = Connection(generation, sock, next(self._numbers), peer)
            thread = threading.Thread(target=self._serve_connection, args=(conn,),
                                      name=f"conn-{conn.number}", daemon=True)
            self._connections[conn] = (thread, generation)
        try:
            thread.start()
        except RuntimeError as err:  # "can't start new thread": out of threads or memory
            self._closed(conn)
            log.error(f"cannot serve connection from {peer or 'local'}: {err}")
            sock.close()

    def _serve_connection(self, conn: Connection) -> None:
        try:
            conn.run()
        finally:
            self._closed(conn)

    def _closed(self, conn: Connection) -> None:
        with self._lock:
            _, generation = self._connections.pop(conn)
            generation.connections -= 1
            last = generation is not self.generation and generation.connections == 0
        if last:  # the main thread unloads it (wait_for_stop)
            self._wake()

    def _refuse(self, sock: socket.socket, peer: str, limit: int) -> None:
        """Over the connection limit: close at once, as nbdkit-limit-filter(1) does.  One
        log line per burst, not one per refused connection."""
        sock.close()
        self._refused += 1
        if self.stats is not None:
            self.stats.refuse("limit")
        if self._refused_log.ready():
            log.error(f"connection limit of {limit} reached (--limit): closed the connection "
                      f"from {peer or 'local'} ({self._refused} refused so far)")

    def serve_here(self, sock: socket.socket) -> None:
        """Serve one connection in the calling thread (``-s``)."""
        Connection(self.generation, sock, next(self._numbers), "").run()

    def request_shutdown(self) -> None:
        self.stop.set()
        self._wake()

    def request_reload(self) -> None:
        """SIGHUP: reload in the main thread as soon as it wakes."""
        self.reload_requested = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.wakeup_fd, b"\0")

    def wait_for_stop(self) -> None:
        """Block until request_shutdown() (or a signal, through the wake-up fd); meanwhile
        reload when asked and unload generations whose last connection has gone."""
        while not self.stop.is_set():
            select.select([self._wake_r], [], [])
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 512)
            # A signal's Python handler runs here, between bytecodes, and sets a flag.
            if self.reload_requested and not self.stop.is_set():
                self.reload_requested = False
                if self.on_reload is not None:
                    self.on_reload()
            self.finish_retired()

    def shutdown_connections(self, timeout: float, grace: float = SHUTDOWN_GRACE) -> bool:
        """Stop serving (proto.md: finish in-flight requests, answer later ones with
        ESHUTDOWN).  Clients get ``grace`` seconds to see ESHUTDOWN and leave; the rest are
        then cut off.  True if all connection threads ended within ``timeout`` seconds."""
        with self._lock:
            # Under the lock: a connection being added now either is in the list or sees
            # stopping when it is made (Connection.__init__).
            self.stopping = True
            connections = [(conn, thread) for conn, (thread, _) in self._connections.items()]
        for conn, _ in connections:
            conn.stop.set()
        deadline = time.monotonic() + grace
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        for conn, thread in connections:
            if thread.is_alive():
                conn.shutdown_read()
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [c for c, t in connections if t.is_alive()]
        if alive:
            log.debug(f"{len(alive)} connection(s) still busy at shutdown")
        return not alive
