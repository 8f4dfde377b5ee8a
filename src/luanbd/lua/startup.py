"""A Lua script's start-up steps, in nbdkit's order: load -> config... -> config_complete ->
get_ready, then (once the server listens and has daemonised) after_fork.

:class:`LuaStartup` is what the server is given to make and start its plugin
(server/lifecycle.py's ``PluginStartup``); the server itself never imports ``luanbd.lua``.
"""

from __future__ import annotations

import os

from luanbd import __version__, log
from luanbd.backend.interface import StartupError
from luanbd.config import ServerConfig, UsageError
from luanbd.lua.plugin import CALLBACKS, LuaPlugin


class LuaStartup:
    """Makes and starts the :class:`LuaPlugin` of ``config.script``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config

    def load(self) -> LuaPlugin:
        """Load the script and pass it the configuration (not config_complete)."""
        config = self.config
        plugin = LuaPlugin(config.script, lua=config.lua, memory_limit=config.lua_memory_limit,
                           gc=config.lua_gc, compiled_lualib=config.lualib)
        plugin.load()
        magic = plugin.string_global("magic_config_key")
        for key, value in config.params:
            name = magic if key is None else key
            if name is None:
                raise UsageError(f"expecting key=value on the command line but got: {value}")
            plugin.config(name, value)
        return plugin

    @staticmethod
    def ready(plugin: LuaPlugin) -> None:
        """config_complete, then get_ready: the plugin may be served."""
        plugin.config_complete()
        plugin.get_ready()

    def after_fork(self, plugin: LuaPlugin) -> None:
        """after_fork, then serving: from now on ``os.exit`` in a callback is that callback's
        error and --request-timeout applies."""
        plugin.after_fork()
        plugin.serving(self.config.request_timeout)

    def connection_plugin(self) -> LuaPlugin:
        """A fresh Lua state for one connection of a serialize_requests/parallel script: the
        script is loaded and configured again, so its globals are its own
        (docs/lua-plugins.md)."""
        plugin = self.load()
        self.ready(plugin)
        self.after_fork(plugin)
        return plugin

    @staticmethod
    def dump_plugin(plugin: LuaPlugin) -> None:
        """--dump-plugin: nbdkit-style ``key=value`` lines, then the script's own output."""
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
