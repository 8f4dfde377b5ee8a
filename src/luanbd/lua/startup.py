"""A Lua script's start-up steps, in nbdkit's order: load -> config... -> config_complete ->
get_ready, then (once the server listens and has daemonised) after_fork; with filters in
front, each ``key=value`` goes through them first and they take their own keys.

:class:`LuaStartup` is what the server is given to make and start its chain
(server/lifecycle.py's ``PluginStartup``); the server itself never imports ``luanbd.lua``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from luanbd import __version__, log
from luanbd.backend.chain import Backend, Chain
from luanbd.backend.interface import StartupError
from luanbd.config import ServerConfig, UsageError
from luanbd.lua.plugin import CALLBACKS, LuaPlugin


class LuaStartup:
    """Makes and starts the chain of ``filters`` (first = nearest the client) in front of
    the :class:`LuaPlugin` of ``config.script``."""

    def __init__(self, config: ServerConfig, filters: Sequence[Backend] = ()) -> None:
        self.config = config
        self.filters = tuple(filters)
        #: The ``key=value`` pairs that reached the script (a connection's own Lua state
        #: gets the same).
        self._plugin_params: list[tuple[str, str]] = []
        #: The script's text as first loaded: every connection's state runs the same code
        #: (a reload, not an edit of the file, changes what is served).
        self._source: bytes | None = None

    def _new_plugin(self) -> LuaPlugin:
        config = self.config
        plugin = LuaPlugin(config.script, lua=config.lua, memory_limit=config.lua_memory_limit,
                           track_memory=config.metrics is not None,
                           gc=config.lua_gc, compiled_lualib=config.lualib,
                           source=self._source)
        self._source = plugin.source
        plugin.load()
        return plugin

    def load(self) -> Chain:
        """Load the script and pass the configuration through the chain (not yet
        config_complete)."""
        plugin = self._new_plugin()
        chain = Chain(plugin, self.filters)
        magic = plugin.string_global("magic_config_key")

        def plugin_config(key: str, value: str) -> None:
            self._plugin_params.append((key, value))
            plugin.config(key, value)

        for key, value in self.config.params:
            name = magic if key is None else key
            if name is None:
                raise UsageError(f"expecting key=value on the command line but got: {value}")
            chain.config(name, value, plugin_config)
        return chain

    @staticmethod
    def ready(chain: Chain) -> None:
        """config_complete, then get_ready, through the chain: it may be served."""
        plugin = _lua(chain)
        chain.config_complete(plugin.config_complete)
        plugin.get_ready()
        chain.get_ready()

    def after_fork(self, chain: Chain) -> None:
        """after_fork, then serving: from now on ``os.exit`` in a callback is that callback's
        error and --request-timeout applies."""
        plugin = _lua(chain)
        plugin.after_fork()
        plugin.serving(self.config.request_timeout)
        chain.after_fork()

    def connection_plugin(self) -> LuaPlugin:
        """A fresh Lua state for one connection of a serialize_requests/parallel script: the
        script is loaded and configured again, so its globals are its own
        (docs/lua-plugins.md).  Only the plugin is new: the filters are the server's."""
        plugin = self._new_plugin()
        for key, value in self._plugin_params:
            plugin.config(key, value)
        plugin.config_complete()
        plugin.get_ready()
        plugin.after_fork()
        plugin.serving(self.config.request_timeout)
        return plugin

    @staticmethod
    def dump_plugin(chain: Chain) -> None:
        """--dump-plugin: nbdkit-style ``key=value`` lines, then the script's own output."""
        plugin = _lua(chain)
        lines = [
            f"path={os.path.abspath(plugin.script)}",
            f"name={plugin.string_global('name') or 'lua'}",
            f"version={plugin.string_global('version') or __version__}",
            f"api_version={plugin.api_version}",
            f"thread_model={plugin.thread_model}",
            f"lua_version={plugin.lua_release}",
            f"lua_runtime={plugin.lua_version}",
        ]
        lines += [f"has_{name}=1" for name in CALLBACKS if plugin.has(name)]
        print("\n".join(lines), flush=True)
        plugin.dump_plugin()


def _lua(chain: Chain) -> LuaPlugin:
    plugin = chain.plugin
    assert isinstance(plugin, LuaPlugin)
    return plugin


def print_help(script: str | None, usage: str, script_help: str) -> int:
    """--help: the usage, then the script's ``config_help`` when a script is named."""
    print(usage)
    print(script_help)
    if script is not None:
        try:
            plugin = LuaPlugin(script)
        except StartupError as err:
            log.error(str(err))
            return 1
        text = plugin.string_global("config_help")
        if text:
            print(text)
    return 0
