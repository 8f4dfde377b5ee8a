"""Compiled versions of Lua standard library functions for the Lua 5.4 state.

``luanbd.lua._lualib`` (built by setup.py when a C compiler is there) holds a
``table.concat`` and a file ``read`` method that give the same results and errors as Lua
5.4's, each with one copy of the result less in the common case (a table of strings; a big
count of bytes), see _lualib.c for why it matters.  They are installed before the script
loads, so a script's ``local concat = table.concat`` gets it.  ``ServerConfig.lualib``
False (``LUANBD_LUALIB=0``) keeps Lua's own functions (to compare, or to rule it out);
other Lua versions always keep theirs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

try:
    from luanbd.lua import _lualib
except ImportError:  # built without a C compiler
    _lualib = None  # type: ignore[assignment]

#: The extension was built at install.
BUILT = _lualib is not None


def install(lua_globals: Any, lupa_module: ModuleType, enabled: bool = True) -> bool:
    """Replace ``table.concat`` in this Lua state; False when it keeps Lua's own."""
    if not (BUILT and enabled) or lupa_module.__name__ != "lupa.lua54":
        return False
    if not _lualib.bind(lupa_module.__file__ or ""):
        return False
    path = _lualib.__file__.encode()
    probe = lua_globals.package.loadlib(path, b"luanbd_lualib_probe")
    concat = lua_globals.package.loadlib(path, b"luanbd_table_concat")
    if isinstance(probe, tuple) or isinstance(concat, tuple):  # (nil, message, where)
        return False
    # A Lua built with a bigger luaL_Buffer than _lualib.c's would overrun it.
    lua_size, our_size = probe()
    if lua_size > our_size:
        return False
    lua_globals.table.concat = concat
    _install_file_read(lua_globals, path)
    return True


def _install_file_read(lua_globals: Any, path: bytes) -> None:
    """Replace the ``read`` method of Lua file handles (io.open's) with _lualib.c's, which
    reads a big count straight into its string and is Lua's own read for everything else."""
    io, getmetatable = lua_globals.io, lua_globals.getmetatable
    if io is None or getmetatable is None:
        return
    methods = getmetatable(io.stdout)[b"__index"]
    install = lua_globals.package.loadlib(path, b"luanbd_file_read_install")
    read = lua_globals.package.loadlib(path, b"luanbd_file_read")
    if isinstance(install, tuple) or isinstance(read, tuple) or methods is None:
        return
    install(methods[b"read"])
    methods[b"read"] = read


def blank_string(lua_globals: Any) -> Any:
    """Lua function ``blank(n)``: a new string of n unspecified bytes that costs only its own
    memory and no copy (_lualib.c), for a WRITE payload to be received into (every byte is
    written before Lua code sees it); call only after install()."""
    assert BUILT
    fn = lua_globals.package.loadlib(_lualib.__file__.encode(), b"luanbd_blank_string")
    return None if isinstance(fn, tuple) else fn


def state(enabled: bool) -> str:
    """For --dump-config: yes (installed in Lua 5.4 states), no (not built), off."""
    if not BUILT:
        return "no"
    return "yes" if enabled else "off"
