"""LuaFilter: a Lua script as a filter layer (``--filter=./myfilter.lua``; docs/lua-filters.md).

The script runs in a Lua state of its own (the plugin's ``nbdkit`` table, plus
``filter.lua``'s ``next`` objects) and defines nbdkit-filter(3)'s callbacks in the plugin
API's Lua shape with ``next`` first: ``pread(next, h, count, offset, flags)`` may call
``next:pread(count, offset, flags)``.  A callback the script does not define passes the call
through (luanbd.backend.chain.Backend's default).

One state serves every connection, so its callbacks run one at a time (lupa holds the
state's lock for a whole call, including the next layer's work inside it).  A failure of the
next layer that the filter does not catch is re-raised as the very same error, so it keeps
its errno and is logged once, as without the filter.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from importlib import resources
from typing import Any

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    CacheMode,
    FastZeroRefused,
    FuaMode,
    Handle,
    PluginError,
    StartupError,
    ThreadModel,
    ZeroMode,
)
from luanbd.lua import results
from luanbd.lua.filter_next import NextLayer, Pending, primitives
from luanbd.lua.script import LuaScript

#: Every callback a filter script may define (nbdkit-filter(3)).
FILTER_CALLBACKS = (
    "load", "unload", "config", "config_complete", "thread_model", "get_ready", "after_fork",
    "cleanup", "preconnect", "list_exports", "default_export", "open", "prepare", "finalize",
    "close", "export_description", "get_size", "block_size", "can_write", "can_flush",
    "is_rotational", "can_trim", "can_zero", "can_fast_zero", "can_extents", "can_fua",
    "can_multi_conn", "can_cache", "pread", "pwrite", "flush", "trim", "zero", "cache",
    "extents",
)


def is_lua_filter(name: str) -> bool:
    """``--filter=NAME`` names a Lua script rather than a built-in filter."""
    return name.endswith(".lua") or os.sep in name


class FilterScript(LuaScript):
    """A filter's script: no required callbacks, every nbdkit-filter(3) callback, and
    ``filter.lua`` installed before the script runs."""

    callbacks = FILTER_CALLBACKS
    required = ()
    default_thread_model = ThreadModel.PARALLEL

    def _before_script(self) -> None:
        source = resources.files("luanbd.lua").joinpath("filter.lua").read_bytes()
        chunk = self._load_string(source, b"=filter.lua")
        self.pending = Pending()
        table = self.runtime.table_from(
            {name.encode(): fn for name, fn in primitives(self.pending, self.runtime).items()})
        self.next_control = chunk(table)

    def _read_api_version(self) -> int:
        return 2  # a filter always gets the whole API (flags, every callback)


class _Connection:
    """A filter's handle for one connection: the script's own handle and the ``next``
    object its callbacks get."""

    __slots__ = ("below", "handle", "next")

    def __init__(self, below: NextLayer, lua_next: Any) -> None:
        self.below = below
        self.next = lua_next
        self.handle: Any = None


class LuaFilter(Backend):
    """A Lua filter script as one layer of the chain."""

    def __init__(self, path: str, *, lua: str = "5.4", memory_limit: int | None = None,
                 gc: str | None = None, compiled_lualib: bool = True,
                 request_timeout: float | None = None) -> None:
        self.s = FilterScript(path, lua=lua, memory_limit=memory_limit, gc=gc,
                              compiled_lualib=compiled_lualib)
        base = os.path.basename(path)
        self.name = base[:-4] if base.endswith(".lua") else base
        self.config_help = self.s.string_global("config_help") or ""
        self._request_timeout = request_timeout
        self._fn = self.s.fn
        self._next_control = self.s.next_control
        self._pending = self.s.pending
        # The plugin's other metadata contexts reach the client through a script that
        # leaves extents, size and data alone (backend/meta.py).
        self.passes_meta_contexts = not any(
            name in self._fn for name in ("extents", "can_extents", "get_size", "pwrite"))
        if "load" in self._fn:
            self._startup("load")

    # --- calling the script -------------------------------------------------------------
    def _raw(self, name: str, *args: Any) -> Any:
        return self.s._call(self._fn[name], *args)

    def _call(self, name: str, *args: Any) -> Any:
        """Callback ``name``'s first result; a failure of the next layer passed up
        unchanged, anything else as the filter's PluginError."""
        try:
            return self.s.call(name, *args)
        except PluginError as err:
            raise self._pending.take(err) from None

    def _call_multi(self, name: str, *args: Any) -> tuple[Any, ...]:
        try:
            return self.s.call_multi(name, *args)
        except PluginError as err:
            raise self._pending.take(err) from None

    def _startup(self, name: str, *args: Any) -> Any:
        """A start-up callback: its failure (or the next layer's) stops the server."""
        try:
            return self._call(name, *args)
        except PluginError as err:
            raise StartupError(str(err)) from None

    def _logged(self, name: str, *args: Any) -> None:
        try:
            self._call(name, *args)
        except PluginError as err:
            log.error(str(err))

    def _function(self, fn: Callable[..., Any]) -> Any:
        """A Python callable as the ``next`` function of a callback before open."""
        return self._next_control.next_function(self._pending.guard(fn))

    # --- process-wide -------------------------------------------------------------------
    @property
    def thread_model(self) -> ThreadModel:
        return self.s.thread_model

    def passes_plain_requests(self) -> bool:
        return "pread" not in self._fn and "pwrite" not in self._fn

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if "config" not in self._fn:
            next(key, value)
            return
        self._startup("config", self._function(
            lambda k, v: next(os.fsdecode(k), os.fsdecode(v))),
            os.fsencode(key), os.fsencode(value))

    def config_complete(self, next: Callable[[], None]) -> None:
        if "config_complete" in self._fn:
            called = []

            def rest() -> None:
                called.append(True)
                next()
            self._startup("config_complete", self._function(rest))
            if not called:
                next()  # (a filter that forgot next(): the layers below still complete)
        else:
            next()
        self.s.resolve_callbacks()
        self._fn = self.s.fn

    def get_ready(self) -> None:
        if "get_ready" in self._fn:
            self._startup("get_ready", str(self.chain_thread_model).encode())

    def after_fork(self) -> None:
        if "after_fork" in self._fn:
            self._startup("after_fork")
        self.s._control.serving(self._request_timeout)

    def cleanup(self) -> None:
        if "cleanup" in self._fn:
            self._logged("cleanup")

    def unload(self) -> None:
        if "unload" in self._fn:
            self._logged("unload")

    # --- before a handle exists ---------------------------------------------------------
    def preconnect(self, next: Context, readonly: bool) -> None:
        if "preconnect" not in self._fn:
            next.preconnect(readonly)
            return
        self._call("preconnect", self._function(lambda ro: next.preconnect(bool(ro))),
                   readonly)

    def list_exports(self, next: Context, readonly: bool,
                     is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        if "list_exports" not in self._fn:
            return next.list_exports(readonly, is_tls)

        def below(ro: Any, tls: Any) -> Any:
            items = next.list_exports(bool(ro), bool(tls))
            return self.s.runtime.table_from([
                self.s.runtime.table_from({b"name": name, b"description": desc})
                for name, desc in items])
        value = self._call("list_exports", self._function(below), readonly, is_tls)
        return results.exports(value, self.s._lua_type)

    def default_export(self, next: Context, readonly: bool, is_tls: bool) -> bytes | None:
        if "default_export" not in self._fn:
            return next.default_export(readonly, is_tls)
        value = self._call("default_export", self._function(
            lambda ro, tls: next.default_export(bool(ro), bool(tls))), readonly, is_tls)
        return results.optional_string("default_export", value)

    def open(self, next: Context, readonly: bool) -> Handle:
        below = NextLayer(next)
        conn = _Connection(below, self._next_control.new_next(below))
        try:
            if "open" in self._fn:
                info = current.connection()
                name = info.export_name if info is not None else None
                is_tls = info.is_tls if info is not None else False
                conn.handle = self._call("open", conn.next, readonly,
                                         name if name is not None else b"", is_tls)
            if not below.opened:
                below.open(readonly)
            if "prepare" in self._fn:
                self._call("prepare", conn.next, conn.handle, readonly)
        except BaseException:
            if below.opened:
                next.close()
            raise
        return conn

    def close(self, next: Context, h: Handle) -> None:
        conn: _Connection = h
        try:
            if "finalize" in self._fn:
                self._logged("finalize", conn.next, conn.handle)
            if "close" in self._fn:
                self._logged("close", conn.handle)
        finally:
            conn.next = None
            next.close()

    # --- capabilities -------------------------------------------------------------------
    def get_size(self, next: Context, h: Handle) -> int:
        if "get_size" not in self._fn:
            return next.get_size()
        size = results.integer("get_size", self._call("get_size", h.next, h.handle), self.s.g)
        if size < 0:
            raise PluginError("get_size", f".get_size function returned invalid value ({size})",
                              bare=True)
        return size

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        if "block_size" not in self._fn:
            return next.block_size()
        return results.block_size(self._call_multi("block_size", h.next, h.handle), self.s.g)

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        if "export_description" not in self._fn:
            return next.export_description()
        return results.optional_string("export_description",
                                       self._call("export_description", h.next, h.handle))

    def _bool(self, name: str, next_answer: Callable[[], bool], h: _Connection) -> bool:
        if name not in self._fn:
            return next_answer()
        return results.boolean(name, self._call(name, h.next, h.handle))

    def can_write(self, next: Context, h: Handle) -> bool:
        return self._bool("can_write", next.can_write, h)

    def can_flush(self, next: Context, h: Handle) -> bool:
        return self._bool("can_flush", next.can_flush, h)

    def is_rotational(self, next: Context, h: Handle) -> bool:
        return self._bool("is_rotational", next.is_rotational, h)

    def can_trim(self, next: Context, h: Handle) -> bool:
        return self._bool("can_trim", next.can_trim, h)

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return self._bool("can_fast_zero", next.can_fast_zero, h)

    def can_extents(self, next: Context, h: Handle) -> bool:
        return self._bool("can_extents", next.can_extents, h)

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        return self._bool("can_multi_conn", next.can_multi_conn, h)

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        if "can_zero" not in self._fn:
            return next.can_zero()
        value = self._call("can_zero", h.next, h.handle)
        if isinstance(value, bool):  # the plugin API's answer: true = this layer zeroes
            return ZeroMode.NATIVE if value else ZeroMode.NONE
        if not isinstance(value, int) or value not in (0, 1, 2):
            raise PluginError("can_zero", "return value is not a boolean or one of "
                                          "nbdkit.ZERO_NONE, _EMULATE or _NATIVE")
        return ZeroMode(value)

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        if "can_fua" not in self._fn:
            return next.can_fua()
        return FuaMode(results.mode("can_fua", self._call("can_fua", h.next, h.handle)))

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        if "can_cache" not in self._fn:
            return next.can_cache()
        return CacheMode(results.mode("can_cache", self._call("can_cache", h.next, h.handle)))

    # --- data ---------------------------------------------------------------------------
    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        if "pread" not in self._fn:
            return next.pread(count, offset, flags)
        res = self._raw("pread", h.next, h.handle, count, offset, flags)
        if res.__class__ is tuple and res[0] is True and len(res) > 1:
            value = res[1]
            if value.__class__ is bytes and len(value) == count:
                return value
        try:
            return results.pread_data(res, count, self.s.g)
        except PluginError as err:
            raise self._pending.take(err) from None

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        if "pwrite" not in self._fn:
            next.pwrite(buf, offset, flags)
            return
        self._call("pwrite", h.next, h.handle, bytes(buf), offset, flags)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        if "flush" not in self._fn:
            next.flush(flags)
            return
        self._call("flush", h.next, h.handle, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if "trim" not in self._fn:
            next.trim(count, offset, flags)
            return
        self._call("trim", h.next, h.handle, count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if "zero" not in self._fn:
            next.zero(count, offset, flags)
            return
        try:
            self._call("zero", h.next, h.handle, count, offset, flags)
        except PluginError as err:
            # ENOTSUP to a fast zero is the refusal the client asked for, not a failure
            # to log (nbdkit's filters answer it with *err = ENOTSUP and no message).
            if (flags & FLAG_FAST_ZERO and err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
                    and not isinstance(err, FastZeroRefused)):
                raise FastZeroRefused from None
            raise

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if "cache" not in self._fn:
            next.cache(count, offset, flags)
            return
        self._call("cache", h.next, h.handle, count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        if "extents" not in self._fn:
            return next.extents(count, offset, flags)
        value = self._call("extents", h.next, h.handle, count, offset, flags)
        return results.extents(value, self.s._lua_type, self.s.g)


def help_text(path: str) -> str:
    """--help for a Lua filter: its ``config_help`` global."""
    try:
        script = FilterScript(path)
    except StartupError as err:
        return f"({err})"
    return script.string_global("config_help") or "(no parameters)"


__all__ = ["FILTER_CALLBACKS", "LuaFilter", "help_text", "is_lua_filter"]
