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
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from types import TracebackType

from luanbd.backend.interface import Plugin
from luanbd.config import ServerConfig
from luanbd.lua.plugin import LuaPlugin
from luanbd.server.captive import Endpoint
from luanbd.server.listener import Listener, bind_tcp, bind_unix
from luanbd.server.service import Service

__all__ = ["RunningServer", "serve"]


class RunningServer:
    """A server started by :func:`serve`; a context manager that closes it."""

    def __init__(self, service: Service, listener: Listener, endpoint: Endpoint,
                 private_dir: str | None, plugin: Plugin) -> None:
        self.service = service
        self.endpoint = endpoint
        self._listener = listener
        self._private_dir = private_dir
        self._plugin = plugin
        self._closed = False

    @property
    def uri(self) -> str:
        """An NBD URI for clients (``nbd+unix://...`` or ``nbd://localhost:PORT``)."""
        return self.endpoint.uri

    def close(self, timeout: float = 10.0) -> None:
        """Stop listening, finish the connections, then run cleanup/unload."""
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        if self.service.shutdown_connections(timeout):
            self._plugin.cleanup()
            self._plugin.unload()
        if self._private_dir:
            shutil.rmtree(self._private_dir, ignore_errors=True)

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
    socket in a temporary directory.  Raises StartupError for a bad script or config.
    """
    if isinstance(plugin, str | os.PathLike):
        script = os.fspath(plugin)
        lua_plugin = LuaPlugin(script, lua=lua)
        lua_plugin.load()
        items = params.items() if isinstance(params, Mapping) else params
        for key, value in items:
            lua_plugin.config(key, value)
        lua_plugin.config_complete()
        lua_plugin.get_ready()
        lua_plugin.after_fork()
        lua_plugin.serving()  # os.exit in a callback must not end the caller's process
        backend: Plugin = lua_plugin
    else:
        script = "<python>"
        backend = plugin
    config = ServerConfig(script=script, foreground=True, readonly=readonly,
                          export_name=export_name, lua=lua)
    private_dir = None
    if port is not None:
        listener = Listener(bind_tcp(host, port))
        endpoint = Endpoint(port=port, export_name=export_name)
    else:
        if unix_socket is None:
            private_dir = tempfile.mkdtemp(prefix="luanbd")
            unix_socket = os.path.join(private_dir, "socket")
        listener = Listener([bind_unix(unix_socket)])
        endpoint = Endpoint(unix_socket=unix_socket, export_name=export_name)
    service = Service(backend, config)
    listener.start(service.handle)
    return RunningServer(service, listener, endpoint, private_dir, backend)
