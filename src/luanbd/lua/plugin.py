"""LuaPlugin: an nbdkit-style Lua script as a :class:`luanbd.backend.interface.Plugin`.

The script runs in one lupa ``LuaRuntime`` (Lua 5.4 unless asked otherwise).  Loading
follows nbdkit's ``plugins/lua/lua.c``: a first line starting with ``#`` is skipped but
counted, and the chunk is named after the path as given, so errors read ``plugin.lua:12:``.
Every callback goes through the wrapper of ``nbdkit.lua``, which turns a Lua error into
(message, errno) so that it becomes one :class:`PluginError`, never a Python traceback.

Scripts without ``API_VERSION = 2`` get exactly the 2018 seed API (nbdkit-lua-plugin(3));
with it, every nbdkit-plugin(3) callback and the ``flags`` argument.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from luanbd import __version__
from luanbd.backend import current, helpers
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_MAY_TRIM,
    CacheMode,
    FastZeroRefused,
    FuaMode,
    Handle,
    PluginError,
    StartupError,
    ThreadModel,
)
from luanbd.log import debug
from luanbd.lua import lualib, runtime
from luanbd.lua.pinning import PIN_MIN, Pinning
from luanbd.lua.runtime import LUA_MODULES

#: Every callback name a script may define (for --dump-plugin ``has_*`` lines).
CALLBACKS = (
    "load", "unload", "dump_plugin", "config", "config_complete", "thread_model",
    "get_ready", "after_fork", "cleanup", "preconnect", "list_exports", "default_export",
    "open", "close", "export_description", "get_size", "block_size", "can_write",
    "can_flush", "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_extents",
    "can_fua", "can_multi_conn", "can_cache", "pread", "pwrite", "flush", "trim", "zero",
    "cache", "extents",
)
#: The callbacks of the seed (API 1); others are ignored by API 1 scripts, as in nbdkit.
SEED_CALLBACKS = frozenset({
    "dump_plugin", "config", "config_complete", "open", "close", "get_size", "can_write",
    "can_flush", "is_rotational", "can_trim", "pread", "pwrite", "flush", "trim", "zero",
})
REQUIRED = ("open", "get_size", "pread")
#: Under --lua-memory-limit, payloads bigger than this are checked against the room left.
MEMORY_CHECK = 4096
#: Room kept free for the call itself (frames, the string's header) under that limit.
MEMORY_MARGIN = 256 * 1024
#: --lua-gc choices (Lua 5.4's collectgarbage modes).
GC_MODES = ("incremental", "generational")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class LuaPlugin:
    """One Lua script loaded into one Lua state."""

    def __init__(self, script: str, *, lua: str = "5.4",
                 memory_limit: int | None = None, gc: str | None = None) -> None:
        self.script = script
        self.lua_name = lua
        try:
            module = runtime.import_module(lua)
        except (KeyError, ImportError):
            raise StartupError(f"--lua={lua}: this Lua runtime is not available "
                               f"(choose from {', '.join(LUA_MODULES)})") from None
        self._lupa = module
        # unpack_returned_tuples: a Python primitive's (nil, message) reaches Lua as two
        # values, which is how nbdkit.lua tells failure from success.
        self.runtime = module.LuaRuntime(encoding=None, register_eval=False,
                                         register_builtins=False,
                                         unpack_returned_tuples=True,
                                         # --lua-memory-limit: allocations past it fail
                                         # with Lua's "not enough memory" (ENOMEM).
                                         max_memory=memory_limit or None)
        self._memory_limit = memory_limit or 0
        self.g = self.runtime.globals()
        # lupa's `python` table is of no use to an nbdkit script and would let it reach
        # Python objects: scripts see plain Lua plus the `nbdkit` table.
        self.g[b"python"] = None
        self.g.package.loaded[b"python"] = None
        # Before the script: its `local concat = table.concat` must get the faster one.
        self.lualib = lualib.install(self.g, module)
        # Lua's own `load` is a global too: only a script's redefinition is the callback.
        self._builtin_load = self.g.load
        # Lua 5.1 and LuaJIT load strings with loadstring(); load() wants a function there.
        self._load_string = self.g.loadstring or self.g.load
        self._call = self._install_nbdkit_table()
        self._pinning = Pinning.probe(self._control, self.lua_version)
        if gc is not None:
            self._set_gc_mode(gc)
        self._load_script()
        self.api_version = self._read_api_version()
        self.thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS
        self.fn: dict[str, Any] = {}
        self.resolve_callbacks()

    # --- loading ------------------------------------------------------------------------
    def _set_gc_mode(self, mode: str) -> None:
        """--lua-gc: Lua 5.4's collector mode, before the script allocates anything."""
        if mode not in GC_MODES:
            raise StartupError(f"--lua-gc={mode}: choose from {', '.join(GC_MODES)}")
        try:
            self.g.collectgarbage(mode.encode())
        except self._lupa.LuaError:
            # Lua before 5.4 and LuaJIT know neither mode by name.
            raise StartupError(f"--lua-gc={mode}: needs Lua 5.4 or later (--lua=5.4)") from None

    def _install_nbdkit_table(self) -> Callable[..., Any]:
        source = resources.files("luanbd.lua").joinpath("nbdkit.lua").read_bytes()
        chunk = self._load_string(source, b"=nbdkit.lua")
        primitives = self.runtime.table_from({
            name.encode(): fn for name, fn in self._primitives().items()
        })
        call, self._control = chunk(primitives)
        return call  # type: ignore[no-any-return]

    def _primitives(self) -> dict[str, Callable[..., Any]]:
        def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(*args: Any) -> Any:
                try:
                    return fn(*args)
                except Exception as err:  # any failure is a Lua error in the script
                    return None, str(err).encode()
            return wrapped

        def conn() -> current.ConnectionInfo:
            info = current.connection()
            if info is None:
                raise ValueError("this function can only be called from a connection callback")
            return info

        def export_name() -> Any:
            name = conn().export_name
            if name is None:
                raise ValueError("export name is not known yet")
            return name

        def disconnect(force: bool) -> None:
            conn().disconnect(bool(force))

        return {
            "verbose": debug_enabled,
            "debug": lambda msg: debug(_text(msg)),
            "parse_size": guard(lambda s: helpers.parse_size(_text(s))),
            "parse_bool": guard(lambda s: helpers.parse_bool(_text(s))),
            "read_password": guard(lambda s: helpers.read_password(_text(s)).encode()),
            "realpath": guard(lambda s: helpers.realpath(os.fsdecode(s)).encode()),
            "export_name": guard(export_name),
            "is_tls": guard(lambda: conn().is_tls),
            "peer_name": guard(lambda: conn().peer_name.encode()),  # noqa: PLW0108
            "shutdown": guard(lambda: current.request_shutdown()),  # noqa: PLW0108 (late binding)
            "disconnect": guard(disconnect),
            "version": __version__.encode,
            "monotonic": time.monotonic,
        }

    def _load_script(self) -> None:
        try:
            with open(self.script, "rb") as f:
                source = f.read()
        except OSError as err:
            raise StartupError(f"could not parse Lua script cannot open {self.script}: "
                               f"{err.strerror}") from None
        if source.startswith(b"#"):
            # Skip the shebang line but keep its newline so line numbers stay right.
            newline = source.find(b"\n")
            source = b"" if newline < 0 else source[newline:]
        result = self._load_string(source, b"@" + os.fsencode(self.script))
        if isinstance(result, tuple):
            raise StartupError(f"could not parse Lua script {_text(result[1])}")
        ok, *rest = self._results(self._call(result))
        if not ok:
            raise StartupError(f"could not run Lua script: {_text(rest[0])}")
        for name in REQUIRED:
            if self._lua_type(self.g[name.encode()]) != "function":
                raise StartupError(
                    f"{self.script}: one of the required callbacks 'open', 'get_size' or "
                    f"'pread' is not defined by this Lua script.  nbdkit requires these "
                    f"callbacks.")

    def _read_api_version(self) -> int:
        value = self.g[b"API_VERSION"]
        if value is None:
            return 1
        if value in (1, 2) and not isinstance(value, bool):
            return int(value)
        raise StartupError(f"{self.script}: API_VERSION must be 1 or 2, not {_text(value)}")

    def _lua_type(self, value: Any) -> str:
        return str(self._lupa.lua_type(value)) if value is not None else "nil"

    def resolve_callbacks(self) -> None:
        """Look up the callback functions (again after config_complete)."""
        allowed = SEED_CALLBACKS if self.api_version == 1 else frozenset(CALLBACKS)
        self.fn = {}
        for name in CALLBACKS:
            value = self.g[name.encode()]
            if name == "load" and self.g.rawequal(value, self._builtin_load):
                continue
            if name in allowed and self._lua_type(value) == "function":
                self.fn[name] = value
        if self.api_version == 2:
            self.thread_model = self._thread_model()

    def has(self, name: str) -> bool:
        return name in self.fn

    def string_global(self, name: str) -> str | None:
        value = self.g[name.encode()]
        return _text(value) if isinstance(value, bytes) else None

    # --- calling ------------------------------------------------------------------------
    @staticmethod
    def _results(value: Any) -> tuple[Any, ...]:
        return value if isinstance(value, tuple) else (value,)

    def call(self, name: str, *args: Any) -> Any:
        """Call callback ``name``; its first result, or PluginError."""
        return self._result(name, self._call(self.fn[name], *args))

    @classmethod
    def _result(cls, name: str, res: Any) -> Any:
        """The first result of a wrapped call, or the PluginError it stands for."""
        values = cls._unwrap(name, res)
        return values[0] if values else None

    @classmethod
    def _unwrap(cls, name: str, res: Any) -> tuple[Any, ...]:
        """All results of a wrapped call ``(true, ...)``, or raise for ``(false, msg, errno)``."""
        values = cls._results(res)
        if values[0]:
            return values[1:]
        raise PluginError(name, _text(values[1]), int(values[2] or errno.EIO))

    def call_multi(self, name: str, *args: Any) -> tuple[Any, ...]:
        return self._unwrap(name, self._call(self.fn[name], *args))

    def _bool(self, name: str, h: Handle, default: bool) -> bool:
        if name not in self.fn:
            return default
        value = self.call(name, h)
        if not isinstance(value, bool):
            raise PluginError(name, "return value is not a boolean")
        return value

    def _int(self, name: str, value: Any) -> int:
        if isinstance(value, bool):
            raise PluginError(name, "cannot convert returned value to an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and abs(value) < 2**63:
            return int(value)
        if isinstance(value, bytes):
            number = self.g.tonumber(value)
            if number is not None:
                return self._int(name, number)
        raise PluginError(name, "cannot convert returned value to an integer")

    # --- start-up lifecycle -------------------------------------------------------------
    def serving(self, request_timeout: float | None = None) -> None:
        """From now on clients are served: ``os.exit`` becomes an error of the callback that
        calls it, and with ``request_timeout`` a callback running longer fails (EIO)."""
        self._control.serving(request_timeout)

    def load(self) -> None:
        if "load" in self.fn:
            self._startup_call("load")

    def _startup_call(self, name: str, *args: Any) -> Any:
        try:
            return self.call(name, *args)
        except PluginError as err:
            raise StartupError(str(err)) from None

    def config(self, key: str, value: str) -> None:
        if "config" not in self.fn:
            raise StartupError(f"{self.script}: this plugin does not need command line "
                               f"configuration")
        self._startup_call("config", os.fsencode(key), os.fsencode(value))

    def config_complete(self) -> None:
        if "config_complete" in self.fn:
            self._startup_call("config_complete")
        self.resolve_callbacks()

    def get_ready(self) -> None:
        if "get_ready" in self.fn:
            self._startup_call("get_ready")

    def after_fork(self) -> None:
        if "after_fork" in self.fn:
            self._startup_call("after_fork")

    def cleanup(self) -> None:
        if "cleanup" in self.fn:
            self._logged_call("cleanup")

    def unload(self) -> None:
        if "unload" in self.fn:
            self._logged_call("unload")

    def _logged_call(self, name: str, *args: Any) -> None:
        from luanbd.log import error

        try:
            self.call(name, *args)
        except PluginError as err:
            error(str(err))

    def dump_plugin(self) -> None:
        if "dump_plugin" in self.fn:
            sys.stdout.flush()
            # An error is logged and --dump-plugin still succeeds, as with nbdkit 1.32.
            self._logged_call("dump_plugin")
            self.g.io.stdout.flush(self.g.io.stdout)

    def _thread_model(self) -> ThreadModel:
        value = self.g[b"thread_model"]
        if self._lua_type(value) == "function":
            value = self._startup_call("thread_model")
        if value is None:
            return ThreadModel.SERIALIZE_ALL_REQUESTS
        if not isinstance(value, bytes | int | float):
            raise StartupError(f"thread_model: unknown thread model (a {self._lua_type(value)} "
                               f"value)")
        try:
            return ThreadModel[_text(value).upper()]
        except KeyError:
            raise StartupError(f"thread_model: unknown thread model '{_text(value)}'") from None

    @property
    def lua_release(self) -> str:
        """The release number, as nbdkit's ``lua_version=`` ("5.4.8")."""
        return runtime.release(self._lupa)

    @property
    def lua_version(self) -> str:
        """The runtime's own name: ``_VERSION`` ("Lua 5.4"), or LuaJIT's "LuaJIT 2.1..."."""
        jit = self.g.jit
        if jit is not None:
            return _text(jit.version)
        return _text(self.g._VERSION)

    # --- connection lifecycle -----------------------------------------------------------
    def preconnect(self, readonly: bool) -> None:
        if "preconnect" in self.fn:
            self.call("preconnect", readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        if "list_exports" not in self.fn:
            name = self.default_export(readonly, is_tls)
            return [(name if name is not None else b"", None)]
        value = self.call("list_exports", readonly, is_tls)
        if self._lua_type(value) != "table":
            raise PluginError("list_exports", "return value is not a table")
        exports: list[tuple[bytes, bytes | None]] = []
        for i in range(1, len(value) + 1):
            item = value[i]
            if isinstance(item, bytes):
                exports.append((item, None))
            elif self._lua_type(item) == "table" and isinstance(item[b"name"], bytes):
                desc = item[b"description"]
                exports.append((item[b"name"], desc if isinstance(desc, bytes) else None))
            else:
                raise PluginError("list_exports",
                                  f"item {i} is not a name or a {{name=..., description=...}}")
        return exports

    def default_export(self, readonly: bool, is_tls: bool) -> bytes | None:
        if "default_export" not in self.fn:
            return b""
        value = self.call("default_export", readonly, is_tls)
        if value is None or isinstance(value, bytes):
            return value
        raise PluginError("default_export", "return value is not a string")

    def open(self, readonly: bool) -> Handle:
        return self.call("open", readonly)

    def close(self, h: Handle) -> None:
        if "close" in self.fn:
            self._logged_call("close", h)

    # --- capabilities -------------------------------------------------------------------
    def get_size(self, h: Handle) -> int:
        size = self._int("get_size", self.call("get_size", h))
        if size < 0:
            raise PluginError("get_size", f".get_size function returned invalid value ({size})",
                              bare=True)
        return size

    def block_size(self, h: Handle) -> tuple[int, int, int] | None:
        if "block_size" not in self.fn:
            return None
        values = self.call_multi("block_size", h)
        if len(values) != 3:
            raise PluginError("block_size", "expected 3 return values: minimum, preferred, "
                                            "maximum")
        minimum, preferred, maximum = (self._int("block_size", v) for v in values)
        if (minimum, preferred, maximum) == (0, 0, 0):
            return None
        if not (_pow2(minimum) and 1 <= minimum <= 65536 and _pow2(preferred)
                and 512 <= preferred <= 32 * 1024 * 1024 and minimum <= preferred <= maximum
                and (maximum == 0xFFFFFFFF or maximum % minimum == 0)):
            raise PluginError("block_size", f"invalid block size constraints: minimum="
                                            f"{minimum} preferred={preferred} maximum={maximum}")
        return minimum, preferred, maximum

    def export_description(self, h: Handle) -> bytes | None:
        if "export_description" not in self.fn:
            return None
        value = self.call("export_description", h)
        if value is None or isinstance(value, bytes):
            return value
        raise PluginError("export_description", "return value is not a string")

    def can_write(self, h: Handle) -> bool:
        return self._bool("can_write", h, self.has("pwrite"))

    def can_flush(self, h: Handle) -> bool:
        # nbdkit 1.16-1.32 looks up "plugin_flush" here and never finds it; we use "flush".
        return self._bool("can_flush", h, self.has("flush"))

    def is_rotational(self, h: Handle) -> bool:
        return self._bool("is_rotational", h, False)

    def can_trim(self, h: Handle) -> bool:
        return self._bool("can_trim", h, self.has("trim"))

    def can_zero(self, h: Handle) -> bool:
        if self.api_version == 1:
            return True  # the seed's zero: a missing one falls back to pwrite (ENOTSUP)
        return self._bool("can_zero", h, self.has("zero"))

    def can_fast_zero(self, h: Handle) -> bool:
        if self.api_version == 1:
            return True  # advertised, and every fast zero fails at once (as nbdkit v1)
        if "can_fast_zero" in self.fn:
            return self._bool("can_fast_zero", h, False)
        return not self.has("zero") or not self.can_zero(h)

    def can_extents(self, h: Handle) -> bool:
        return self._bool("can_extents", h, self.has("extents"))

    def can_fua(self, h: Handle) -> FuaMode:
        if self.api_version == 1:
            return FuaMode.EMULATE
        if "can_fua" in self.fn:
            return FuaMode(self._mode("can_fua", h))
        return FuaMode.EMULATE if self.has("flush") else FuaMode.NONE

    def can_multi_conn(self, h: Handle) -> bool:
        return self._bool("can_multi_conn", h, False)

    def can_cache(self, h: Handle) -> CacheMode:
        if "can_cache" in self.fn:
            return CacheMode(self._mode("can_cache", h))
        return CacheMode.NATIVE if self.has("cache") else CacheMode.NONE

    def _mode(self, name: str, h: Handle) -> int:
        value = self.call(name, h)
        if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2):
            raise PluginError(name, "return value is not one of nbdkit."
                                    f"{name[4:].upper()}_NONE, _EMULATE or _NATIVE")
        return value

    # --- data ---------------------------------------------------------------------------
    def pread(self, h: Handle, count: int, offset: int, flags: int) -> bytes | memoryview:
        # Hot path: one Lua call through the wrapper, then the common answer (a string of
        # exactly count bytes) with no further checks.
        fn = self.fn["pread"]
        if count >= PIN_MIN and self._pinning is not None:
            return self._pread_pinned(fn, h, count, offset, flags)
        if self.api_version == 1:
            res = self._call(fn, h, count, offset)
        else:
            res = self._call(fn, h, count, offset, flags)
        if res.__class__ is tuple and res[0] is True and len(res) > 1:
            value = res[1]
            if value.__class__ is bytes and len(value) == count:
                return value
        return self._pread_result(res, count)

    def _pread_pinned(self, fn: Any, h: Handle, count: int, offset: int,
                      flags: int) -> bytes | memoryview:
        """A large pread whose string is sent from Lua's memory (luanbd.lua.pinning)."""
        pinning = self._pinning
        assert pinning is not None
        if pinning.released:
            pinning.unpin_released()
        if self.api_version == 1:
            res = pinning.pread_pinned(count, fn, h, count, offset)
        else:
            res = pinning.pread_pinned(count, fn, h, count, offset, flags)
        if res[0] is not False:
            return pinning.view(res[0], res[1], count)
        # Anything but a string of exactly count bytes: what the call returned, as usual.
        return self._pread_result(res[1] if len(res) == 2 else res[1:], count)

    def fastpath_calls(self) -> tuple[Any, Any, Any, bool]:
        """What the compiled request loop (luanbd.server._fastpath) calls for a small READ
        or WRITE: the call wrapper, pread, pwrite (None: not for that loop) and whether the
        flags argument is passed (API version 2).  It does what pread/pwrite below do for
        counts under PIN_MIN, and hands any result but success to fastpath_result."""
        # --lua-memory-limit checks each payload first (pwrite): leave those to Python.
        pwrite = self.fn.get("pwrite") if not self._memory_limit else None
        return self._call, self.fn["pread"], pwrite, self.api_version != 1

    def fastpath_result(self, is_read: bool, res: Any, count: int) -> bytes | memoryview | None:
        """A result the compiled loop did not take as success: READ data, or PluginError."""
        if is_read:
            return self._pread_result(res, count)
        self._unwrap("pwrite", res)
        return None

    def _pread_result(self, res: Any, count: int) -> bytes | memoryview:
        if res.__class__ is tuple and res[0] is True and len(res) > 1:
            value = res[1]
            if value.__class__ is bytes and len(value) == count:
                return value
        elif res is True or not res[0]:
            value = self._result("pread", res)
        else:
            value = None
        if isinstance(value, bytes):
            if len(value) == count:
                return value
            if len(value) > count:
                return memoryview(value)[:count]
            raise PluginError("pread", "returned string length < count bytes")
        if isinstance(value, int | float) and not isinstance(value, bool):
            # Lua turns a number into its text, as lua_tolstring does in nbdkit.
            return self.pread_number(value, count)
        raise PluginError("pread", "return value is not a string")

    def pread_number(self, value: float, count: int) -> bytes:
        text = self.g.tostring(value)
        if len(text) < count:
            raise PluginError("pread", "returned string length < count bytes")
        return bytes(text[:count])

    def pwrite(self, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        if "pwrite" not in self.fn:
            raise PluginError("pwrite", "pwrite not implemented", errno.EROFS)
        if self._memory_limit and len(buf) > MEMORY_CHECK:
            self._reserve(len(buf))
        if self.api_version == 1:
            self.call("pwrite", h, buf, offset)
        else:
            self.call("pwrite", h, buf, offset, flags)

    def _reserve(self, size: int) -> None:
        """Under --lua-memory-limit, refuse (ENOMEM) a payload the Lua state has no room for.

        lupa copies arguments into Lua outside any pcall: an allocation failing there is a
        Lua panic, which aborts the whole process.  So make sure it cannot fail.
        """
        runtime = self.runtime
        if runtime.get_memory_used() + size + MEMORY_MARGIN <= self._memory_limit:
            return
        self.g.collectgarbage(b"collect")  # garbage may be what fills it
        if runtime.get_memory_used() + size + MEMORY_MARGIN > self._memory_limit:
            raise PluginError("pwrite", f"not enough memory for a {size}-byte payload "
                                        f"(--lua-memory-limit)", errno.ENOMEM)

    def flush(self, h: Handle, flags: int) -> None:
        if "flush" in self.fn:
            self._flagged("flush", flags, h)

    def trim(self, h: Handle, count: int, offset: int, flags: int) -> None:
        if "trim" in self.fn:
            self._flagged("trim", flags, h, count, offset)

    def zero(self, h: Handle, count: int, offset: int, flags: int) -> None:
        if self.api_version == 1:
            if flags & FLAG_FAST_ZERO:
                raise FastZeroRefused  # the seed's zero cannot promise to be fast
            if "zero" not in self.fn:
                raise PluginError("zero", "zero is not implemented", errno.EOPNOTSUPP)
            self.call("zero", h, count, offset, bool(flags & FLAG_MAY_TRIM))
            return
        if "zero" not in self.fn:
            raise PluginError("zero", "zero is not implemented", errno.EOPNOTSUPP)
        self.call("zero", h, count, offset, flags)

    def cache(self, h: Handle, count: int, offset: int, flags: int) -> None:
        if "cache" in self.fn:
            self.call("cache", h, count, offset, flags)

    def extents(self, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        value = self.call("extents", h, count, offset, flags)
        if self._lua_type(value) != "table":
            raise PluginError("extents", "return value is not a table")
        out = []
        for i in range(1, len(value) + 1):
            item = value[i]
            if self._lua_type(item) != "table":
                raise PluginError("extents", f"extent {i} is not a table")
            fields = [item[1], item[2], item[3]]
            if fields[0] is None:
                fields = [item[b"offset"], item[b"length"], item[b"type"]]
            if fields[2] is None:
                fields[2] = 0
            try:
                e_offset, e_length, e_type = (self._int("extents", v) for v in fields)
            except PluginError:
                raise PluginError("extents", f"extent {i} must be {{offset, length, type}} "
                                             f"with integers") from None
            out.append((e_offset, e_length, e_type))
        return out

    def _flagged(self, name: str, flags: int, *args: Any) -> None:
        if self.api_version == 1:
            self.call(name, *args)
        else:
            self.call(name, *args, flags)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def debug_enabled() -> bool:
    from luanbd import log

    return log.verbose
