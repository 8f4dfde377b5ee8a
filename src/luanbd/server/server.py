"""Server: one backend chain served on the sockets the configuration names, started and
stopped in nbdkit's order.  The command line (server/lifecycle.py) and ``luanbd.api.serve()``
both use it, so listening and shutdown are written once.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from luanbd.backend import current
from luanbd.backend.chain import Chain
from luanbd.backend.interface import Plugin
from luanbd.config import DEFAULT_PORT, ServerConfig
from luanbd.protocol.constants import BASE_ALLOCATION
from luanbd.server.captive import Endpoint
from luanbd.server.compiled import FASTPATH_BUILT
from luanbd.server.listener import (
    Listener,
    activated_sockets,
    bind_tcp,
    bind_unix,
    bind_vsock,
)
from luanbd.server.service import Service

if TYPE_CHECKING:
    from luanbd.server.metrics import MetricsListener

#: How long connections get to finish their in-flight request when the server stops.
SHUTDOWN_TIMEOUT = 10.0


class Server:
    """A chain, its shared connection state (:class:`Service`) and its listening sockets.

    ``connection_plugin`` makes a fresh plugin instance for one connection where the thread
    model lets connections run at once (a Lua script gets a state of its own per connection).
    """

    def __init__(self, chain: Chain, config: ServerConfig, *,
                 ssl_context: ssl.SSLContext | None = None,
                 connection_plugin: Callable[[], Plugin] | None = None,
                 meta_contexts: tuple[bytes, ...] = (BASE_ALLOCATION,)) -> None:
        self.config = config
        self.service = Service(chain, config, connection_plugin, meta_contexts)
        self.service.ssl_context = ssl_context
        self.listener: Listener | None = None
        #: Where clients connect, as a URI and for --run (None: socket activation, -s).
        self.endpoint: Endpoint | None = None
        self._private_dir: str | None = None
        self._stopped = False
        #: --metrics: the HTTP listener, bound with the NBD sockets.
        self.metrics: MetricsListener | None = None

    @property
    def chain(self) -> Chain:
        """The chain new connections get (a reload replaces it)."""
        return self.service.chain

    def bind(self) -> None:
        """Open the listening sockets the configuration names (nothing for -s).
        Raises BindError or OSError."""
        config = self.config
        if config.metrics is not None:
            from luanbd.server.metrics import MetricsListener

            self.metrics = MetricsListener(config.metrics, self.service, lua=config.lua,
                                           fastpath=FASTPATH_BUILT and config.fastpath)
        if config.listen_fds:
            self.listener = Listener(activated_sockets(config.listen_fds))
        elif config.single:
            return
        elif config.private_socket or config.unix_socket:
            if config.private_socket:
                self._private_dir = tempfile.mkdtemp(prefix="luanbd")
                path = os.path.join(self._private_dir, "socket")
            else:
                assert config.unix_socket is not None
                path = os.path.abspath(config.unix_socket)
            self.listener = Listener([bind_unix(path)])
            self.endpoint = Endpoint(unix_socket=path, export_name=config.export_name,
                                     tls=config.tls, tls_certificates=config.tls_certificates)
        elif config.vsock:
            port = config.port or DEFAULT_PORT
            self.listener = Listener([bind_vsock(port)])
            self.endpoint = Endpoint(port=port, export_name=config.export_name,
                                     tls=config.tls, vsock=True,
                                     tls_certificates=config.tls_certificates)
        else:
            port = config.port or DEFAULT_PORT
            self.listener = Listener(bind_tcp(config.ipaddr, port, config.ip_family))
            self.endpoint = Endpoint(port=port, export_name=config.export_name,
                                     tls=config.tls, tls_certificates=config.tls_certificates)

    def start(self) -> None:
        """Accept connections (in background threads); nbdkit_shutdown stops this server."""
        current.set_stopping(False)
        current.set_shutdown_handler(self.service.request_shutdown)
        if self.metrics is not None:
            self.metrics.start()
        if self.listener is not None:
            self.listener.start(self.service.handle)

    def serve_socket(self, sock: socket.socket) -> None:
        """Serve one already connected socket in the calling thread (-s)."""
        current.set_stopping(False)
        current.set_shutdown_handler(self.service.request_shutdown)
        if self.metrics is not None:
            self.metrics.start()
        self.service.serve_here(sock)

    def wait(self) -> None:
        """Until a signal, nbdkit_shutdown or request_shutdown()."""
        self.service.wait_for_stop()

    def request_shutdown(self) -> None:
        self.service.request_shutdown()

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Stop listening, finish the connections (in-flight requests first), then run
        cleanup and unload on every layer, as nbdkit.  False (and no cleanup) when some
        connection was still busy after ``timeout`` seconds."""
        if self._stopped:
            return True
        self._stopped = True
        current.set_stopping(True)
        if self.listener is not None:
            self.listener.close()
        finished = self.service.shutdown_connections(timeout)
        if finished:
            self.service.finish_all()
        current.set_shutdown_handler(None)
        self.remove_private_dir()
        if self.metrics is not None:
            self.metrics.close()
        return finished

    def remove_private_dir(self) -> None:
        """-U -: the private socket's directory goes when the server does."""
        if self._private_dir:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
