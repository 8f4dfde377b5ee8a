"""LuaPlugin: an nbdkit-style Lua script as a :class:`luanbd.backend.interface.Plugin`.

Loading the script is luanbd.lua.script (a LuaPlugin is a LuaScript), the ``nbdkit`` table
it sees is luanbd.lua.nbdkit_table, and what each callback may answer is luanbd.lua.results.
Here is what nbdkit-plugin(3) makes of the callbacks: the defaults of missing ones, the
arguments of API 1 against API 2, and the request path, including the calls handed to the
compiled request loop (backend.interface.CompiledCalls).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, cast

from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_MAY_TRIM,
    CacheMode,
    FastZeroRefused,
    FuaMode,
    Handle,
    PluginError,
    StartupError,
)
from luanbd.lua import results
from luanbd.lua.pinning import PIN_MIN
from luanbd.lua.results import first, pread_data
from luanbd.lua.script import BIG_REQUEST, CALLBACKS, MEMORY_CHECK, LuaScript

__all__ = ["CALLBACKS", "LuaPlugin"]


class LuaPlugin(LuaScript):
    """One Lua script loaded into one Lua state, as the server's plugin."""

    # --- start-up lifecycle -------------------------------------------------------------
    def serving(self, request_timeout: float | None = None) -> None:
        """From now on clients are served: ``os.exit`` becomes an error of the callback that
        calls it, and with ``request_timeout`` a callback running longer fails (EIO)."""
        self._control.serving(request_timeout)

    def load(self) -> None:
        if "load" in self.fn:
            self._startup_call("load")

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
        # A connection's own Lua state lingers until Python's cycle collector finds it:
        # give back its garbage (big request strings among it) now.
        self.collect_garbage()

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

    # --- connection lifecycle -----------------------------------------------------------
    def preconnect(self, readonly: bool) -> None:
        if "preconnect" in self.fn:
            self.call("preconnect", readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        if "list_exports" not in self.fn:
            name = self.default_export(readonly, is_tls)
            return [(name if name is not None else b"", None)]
        return results.exports(self.call("list_exports", readonly, is_tls), self._lua_type)

    def default_export(self, readonly: bool, is_tls: bool) -> bytes | None:
        if "default_export" not in self.fn:
            return b""
        return results.optional_string("default_export",
                                       self.call("default_export", readonly, is_tls))

    def open(self, readonly: bool) -> Handle:
        return self.call("open", readonly)

    def close(self, h: Handle) -> None:
        if "close" in self.fn:
            self._logged_call("close", h)

    # --- capabilities -------------------------------------------------------------------
    def get_size(self, h: Handle) -> int:
        size = results.integer("get_size", self.call("get_size", h), self.g)
        if size < 0:
            raise PluginError("get_size", f".get_size function returned invalid value ({size})",
                              bare=True)
        return size

    def block_size(self, h: Handle) -> tuple[int, int, int] | None:
        if "block_size" not in self.fn:
            return None
        return results.block_size(self.call_multi("block_size", h), self.g)

    def export_description(self, h: Handle) -> bytes | None:
        if "export_description" not in self.fn:
            return None
        return results.optional_string("export_description",
                                       self.call("export_description", h))

    def _bool(self, name: str, h: Handle, default: bool) -> bool:
        if name not in self.fn:
            return default
        return results.boolean(name, self.call(name, h))

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
            return FuaMode(results.mode("can_fua", self.call("can_fua", h)))
        return FuaMode.EMULATE if self.has("flush") else FuaMode.NONE

    def can_multi_conn(self, h: Handle) -> bool:
        return self._bool("can_multi_conn", h, False)

    def can_cache(self, h: Handle) -> CacheMode:
        if "can_cache" in self.fn:
            return CacheMode(results.mode("can_cache", self.call("can_cache", h)))
        return CacheMode.NATIVE if self.has("cache") else CacheMode.NONE

    # --- data ---------------------------------------------------------------------------
    def pread(self, h: Handle, count: int, offset: int, flags: int) -> bytes | memoryview:
        # Hot path: one Lua call through the wrapper, then the common answer (a string of
        # exactly count bytes) with no further checks.
        fn = self.fn["pread"]
        if count >= BIG_REQUEST:
            self.big_request(count)
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
        return pread_data(res, count, self.g)

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
        return pread_data(res[1] if len(res) == 2 else res[1:], count, self.g)

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
            return pread_data(res, count, self.g)
        results.unwrap("pwrite", res)
        return None

    def pwrite(self, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        if "pwrite" not in self.fn:
            raise PluginError("pwrite", "pwrite not implemented", errno.EROFS)
        pinning = self._pinning
        # Payloads this big may be a Lua string already (payload_buffer).
        slot = (pinning.pwrite_slot(buf) if pinning is not None and len(buf) >= PIN_MIN
                else None)
        if slot is None and len(buf) >= BIG_REQUEST:
            self.big_request(len(buf))
        if self._memory_limit and len(buf) > MEMORY_CHECK:
            self._reserve(len(buf))
        if slot is not None:
            assert pinning is not None
            fn = self.fn["pwrite"]
            if self.api_version == 1:
                first("pwrite", pinning.pwrite_pinned(slot, fn, h, offset))
            else:
                first("pwrite", pinning.pwrite_pinned(slot, fn, h, offset, flags))
        elif self.api_version == 1:
            self.call("pwrite", h, buf, offset)
        else:
            self.call("pwrite", h, buf, offset, flags)

    def payload_buffer(self, size: int) -> tuple[bytes, memoryview] | None:
        """A big WRITE payload received straight into a new Lua string (lua/pinning.py)."""
        pinning = self._pinning
        if pinning is None or not pinning.payloads or "pwrite" not in self.fn:
            return None
        if size >= BIG_REQUEST:
            self.big_request(size)  # before the string is made, as pwrite does for bytes
        try:
            data, view = pinning.payload(size)
        except self._lupa.LuaError:  # no memory for it here: the usual path says so (ENOMEM)
            return None
        # Bytes-like: the request path only passes it down to pwrite above.
        return cast(bytes, data), view

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
        return results.extents(self.call("extents", h, count, offset, flags), self._lua_type,
                               self.g)

    # --- metadata contexts beyond base:allocation (backend/meta.py) ----------------------
    def meta_contexts(self) -> list[bytes]:
        """The script's own contexts, asked once at start-up (after get_ready)."""
        if "meta_contexts" not in self.fn:
            return []
        try:
            names = results.context_names(self.call("meta_contexts"), self._lua_type)
        except PluginError as err:
            raise StartupError(str(err)) from None
        if names and "meta_extents" not in self.fn:
            raise StartupError(f"{self.script}: meta_contexts needs a meta_extents callback")
        return names

    def meta_extents(self, h: Handle, context: bytes, count: int, offset: int,
                     flags: int) -> list[tuple[int, int, int]]:
        if "meta_extents" not in self.fn:
            raise PluginError("meta_extents", "meta_contexts without meta_extents")
        return results.extents(self.call("meta_extents", h, context, count, offset, flags),
                               self._lua_type, self.g, "meta_extents")

    def _flagged(self, name: str, flags: int, *args: Any) -> None:
        if self.api_version == 1:
            self.call(name, *args)
        else:
            self.call(name, *args, flags)
