"""The layers ``--filter=F`` names: a built-in filter (luanbd.filters) or a Lua filter script
(luanbd.lua.filter), found as docs/lua-filters.md "Running filters" says."""

from __future__ import annotations

import os

from luanbd.backend.chain import Backend
from luanbd.config import ServerConfig


def lua_filter_path(name: str) -> str | None:
    """A Lua filter's script: ``./f.lua`` (a path, or a name ending in .lua), or ``NAME``
    that is not built in with ``NAME.lua`` in the plugin directory."""
    from luanbd.config import plugin_dir
    from luanbd.filters import BUILTIN
    from luanbd.lua.filter import is_lua_filter

    if is_lua_filter(name):
        return name
    installed = os.path.join(plugin_dir(), f"{name}.lua")
    if name not in BUILTIN and os.path.isfile(installed):
        return installed
    return None


def make(name: str, config: ServerConfig) -> Backend:
    """The layer ``--filter=name`` names; StartupError if there is none or it fails to load."""
    from luanbd import filters
    from luanbd.lua.filter import LuaFilter

    path = lua_filter_path(name)
    if path is None:
        return filters.create(name)
    return LuaFilter(path, lua=config.lua, memory_limit=config.lua_memory_limit,
                     gc=config.lua_gc, compiled_lualib=config.lualib,
                     request_timeout=config.request_timeout)


def help_text(names: list[str]) -> str:
    """--help: the built-in filters, then the parameters of each filter named."""
    from luanbd import filters
    from luanbd.lua.filter import help_text as lua_help

    text = filters.help_text([n for n in names if lua_filter_path(n) is None])
    for name in names:
        path = lua_filter_path(name)
        if path is not None:
            text += f"\n\nfilter: {name}\n{lua_help(path)}"
    return text
