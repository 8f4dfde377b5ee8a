"""luanbd as a library: serve a Lua script, or any Python object implementing
:class:`luanbd.backend.interface.Plugin`, from Python code.

    >>> from luanbd.api import serve
    >>> with serve("examples/ramdisk.lua", params={"size": "16M"}) as server:
    ...     print(server.uri)        # nbd+unix://?socket=/tmp/luanbd.../socket
    ...     ...                      # connect any NBD client here

The server runs in background threads of the calling process until ``close()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import TracebackType

from luanbd.backend.chain import Chain
from luanbd.backend.interface import Plugin
from luanbd.config import ServerConfig
from luanbd.lua.startup import LuaStartup
from luanbd.server.server import SHUTDOWN_TIMEOUT, Server

__all__ = ["RunningServer", "serve"]


class RunningServer:
    """A server started by :func:`serve`; a context manager that closes it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        assert server.endpoint is not None
        self.endpoint = server.endpoint

    @property
    def uri(self) -> str:
        """An NBD URI for clients (``nbd+unix://...`` or ``nbd://localhost:PORT``)."""
        return self.endpoint.uri

    def close(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop listening, finish the connections, then run cleanup/unload."""
        self.server.stop(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def serve(plugin: str | os.PathLike[str] | Plugin, *,
          params: Mapping[str, str] | Sequence[tuple[str, str]] = (),
          unix_socket: str | None = None, port: int | None = None, host: str | None = None,
          readonly: bool = False, export_name: str = "", lua: str = "5.4") -> RunningServer:
    """Start serving ``plugin`` (a Lua script path or a Plugin object) and return at once.

    Listens on ``unix_socket``, or TCP ``host:port``, or (neither given) a private Unix
    socket in a temporary directory.  A script starts as with the ``luanbd`` command (load,
    config, config_complete, get_ready, after_fork; a serialize_requests or parallel script
    gets a Lua state per connection).  Raises StartupError for a bad script or config.
    """
    items = tuple(params.items() if isinstance(params, Mapping) else params)
    script = os.fspath(plugin) if isinstance(plugin, str | os.PathLike) else "<python>"
    config = ServerConfig(script=script, params=items, foreground=True, readonly=readonly,
                          export_name=export_name, lua=lua, unix_socket=unix_socket,
                          private_socket=unix_socket is None and port is None,
                          port=port, ipaddr=host)
    if isinstance(plugin, str | os.PathLike):
        startup = LuaStartup(config)
        chain = startup.load()
        startup.ready(chain)
        # After after_fork, os.exit in a callback must not end the caller's process.
        startup.after_fork(chain)
        server = Server(chain, config, connection_plugin=startup.connection_plugin)
    else:
        server = Server(Chain(plugin), config)
    server.bind()
    server.start()
    return RunningServer(server)
