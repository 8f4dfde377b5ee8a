"""The Lua runtimes ``--lua`` offers: which lupa module provides each, how it is loaded, and
what can be said about it (its release number, whether its standard library is complete)."""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType

#: ``--lua`` choices and the lupa module that provides each.
LUA_MODULES = {
    "5.4": "lupa.lua54",
    "5.1": "lupa.lua51",
    "5.2": "lupa.lua52",
    "5.3": "lupa.lua53",
    "5.5": "lupa.lua55",
    "luajit": "lupa.luajit21",
}

#: LuaJIT's lua.h says it implements this release of Lua (LUA_RELEASE); it has no lua_ident.
_LUAJIT_RELEASE = "5.1.4"


def installed() -> list[str]:
    """The --lua choices whose lupa module is installed (none of them is loaded)."""
    found = []
    for lua, name in LUA_MODULES.items():
        try:
            if importlib.util.find_spec(name) is not None:
                found.append(lua)
        except (ImportError, ValueError):
            pass
    return found


def import_module(lua: str) -> ModuleType:
    """The lupa module of ``--lua=lua`` (KeyError, ImportError if there is none).

    The first runtime a process loads is loaded with RTLD_GLOBAL, as a Lua interpreter's own
    symbols are visible to what it loads: C modules (Debian's lua-cjson, lua-posix) are not
    linked against a Lua library and find the Lua C API there.  Every runtime is loaded with
    RTLD_DEEPBIND: lupa's wheels call their own Lua API through the PLT, and without it a
    second runtime in the same process (--dump-config's checks, tests) would be bound to the
    first one's functions and crash.

    Under AddressSanitizer (scripts/sanitize.sh) a dlopen with RTLD_DEEPBIND aborts the
    process, so every runtime is loaded RTLD_LOCAL instead: each still binds to its own
    functions, but C modules of Debian's (lua-cjson) cannot find the Lua API there.
    """
    name = LUA_MODULES[lua]
    if _sanitized():
        flags = os.RTLD_NOW
    else:
        flags = os.RTLD_NOW | getattr(os, "RTLD_DEEPBIND", 0)
        if not any(m in sys.modules for m in LUA_MODULES.values()):
            flags |= os.RTLD_GLOBAL
    saved = sys.getdlopenflags()
    sys.setdlopenflags(flags)
    try:
        return importlib.import_module(name)
    finally:
        sys.setdlopenflags(saved)


def _sanitized() -> bool:
    """AddressSanitizer's runtime is in this process (LD_PRELOADed by scripts/sanitize.sh)."""
    try:
        ctypes.CDLL(None)["__asan_init"]
    except AttributeError:
        return False
    return True


def release(module: ModuleType) -> str:
    """The Lua release a lupa module was built from, as nbdkit's ``lua_version=`` prints it
    ("5.4.8"): read from ``lua_ident``, the string every PUC Lua exports."""
    if module.__name__.startswith("lupa.luajit"):
        return _LUAJIT_RELEASE
    try:
        ident = (ctypes.c_char * 256).in_dll(ctypes.CDLL(module.__file__), "lua_ident").value
    except (OSError, ValueError, TypeError):
        ident = b""
    found = re.search(rb"Lua (\d+\.\d+\.\d+)", ident)
    if found:
        return found.group(1).decode()
    major, minor = module.LUA_VERSION[:2]
    return f"{major}.{minor}"


def stdlib_complete(module: ModuleType) -> bool:
    """Whether the runtime was built for POSIX (``LUA_USE_LINUX``), as Debian's Lua is.
    lupa's own wheels are not: their io.popen fails with "'popen' not supported" and
    os.execute returns raw wait statuses (scripts/build_lupa.py builds complete ones)."""
    runtime = module.LuaRuntime(register_eval=False, register_builtins=False)
    ok, _ = runtime.execute("local ok, f = pcall(io.popen, 'exit 0')\n"
                            "if ok and f then f:close() end\n"
                            "return ok, f")
    return bool(ok)
