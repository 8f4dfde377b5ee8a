"""Generations: what a reload (SIGHUP) replaces while clients stay connected.

A generation is one loaded chain (filters and plugin, started through get_ready and
after_fork) with what belongs to it: its locks (the thread model may differ after a reload),
the maker of per-connection plugin instances and the handshake's meta context names.  A
connection keeps the generation it was accepted under until it closes; a retired generation
is cleaned up and unloaded (cleanup, then unload, on every layer) once its last connection
has gone.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Protocol

from luanbd.backend.chain import Chain
from luanbd.backend.interface import Plugin, ThreadModel
from luanbd.backend.locks import Locks, RequestLock
from luanbd.config import ServerConfig
from luanbd.protocol.handshake import HandshakeConfig
from luanbd.server.stats import ServerStats


class Owner(Protocol):
    """What a generation reads from the service that serves it (server/service.py)."""

    config: ServerConfig
    ssl_context: ssl.SSLContext | None
    stopping: bool
    stats: ServerStats | None


class Generation:
    """One chain and its locks: the state a connection shares with the connections accepted
    under the same generation (server/connection.py's ``Shared``)."""

    def __init__(self, owner: Owner, number: int, chain: Chain,
                 plugin_factory: Callable[[], Plugin] | None,
                 meta_contexts: tuple[bytes, ...]) -> None:
        self._owner = owner
        #: 1 for the chain started with the server, then one more per successful reload.
        self.number = number
        #: What every request goes through: the filters, then the plugin.
        self.chain = chain
        self.locks = Locks(chain.thread_model)
        #: The lock of the shared chain: for serialize_connections/all_requests it is the
        #: one request lock of this generation.
        self.shared_lock: RequestLock = self.locks.request_lock()
        #: Makes a fresh plugin instance (a new Lua state) for one connection; used when the
        #: thread model lets connections run at the same time.
        self.plugin_factory = plugin_factory
        config = owner.config
        self.handshake_config = HandshakeConfig(
            handshake_flags=config.handshake_flags,
            structured_replies=config.structured_replies,
            meta_contexts=config.meta_contexts,
            tls=config.tls,
            meta_context_names=meta_contexts,
        )
        #: Connections accepted under this generation and not yet closed (the service's
        #: lock guards it).
        self.connections = 0

    # What every connection reads from the service, the same for every generation.
    @property
    def config(self) -> ServerConfig:
        return self._owner.config

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._owner.ssl_context

    @property
    def stopping(self) -> bool:
        return self._owner.stopping

    @property
    def stats(self) -> ServerStats | None:
        return self._owner.stats

    def chain_for_connection(self) -> tuple[Chain, RequestLock]:
        """The chain and request lock a new connection uses."""
        if self.plugin_factory is not None and self.locks.model >= ThreadModel.SERIALIZE_REQUESTS:
            return self.chain.with_plugin(self.plugin_factory()), self.locks.request_lock()
        return self.chain, self.shared_lock

    def finish(self) -> None:
        """cleanup, then unload, on every layer, with no connection left (the service
        calls it once per generation)."""
        self.chain.cleanup()
        self.chain.unload()
