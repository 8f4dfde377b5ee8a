"""The backend chain: filter layers in front of the plugin (nbdkit ``backend.c``, ``filters.c``,
``plugins.c``).

Every layer is a :class:`Backend` in nbdkit-filter(3)'s ``next`` model: each call gets the
next layer's per-connection :class:`Context` (``next``) and this layer's own handle, and the
base class passes every call through unchanged, so a filter overrides only what it changes.
:class:`PluginBackend` is the last layer: it adapts a :class:`~luanbd.backend.interface.Plugin`.
The chain's thread model is the most restrictive of its layers' (as nbdkit's).

``backend/context.py`` sits on top of the chain for each connection: capabilities asked
once, emulation, locking and the preconditions asserted.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    CacheMode,
    CompiledCalls,
    FastZeroRefused,
    FuaMode,
    Handle,
    PayloadBuffers,
    Plugin,
    PluginError,
    ThreadModel,
    ZeroMode,
)
from luanbd.backend.meta import ContextMeta, LayerMeta, PluginContextMeta

_ZERO_CHUNK = 1024 * 1024  # the most an emulated zero writes per pwrite, as context.py
_ZEROES = bytes(_ZERO_CHUNK)


class Backend(LayerMeta):
    """One filter layer; the defaults pass each call to ``next`` unchanged."""

    #: Shown in log lines (nbdkit's filter name).
    name = "filter"
    #: The filter's parameters, for --help (nbdkit-filter(3)'s config_help).
    config_help = ""
    #: The chain's thread model, set before get_ready (nbdkit passes it to .get_ready).
    chain_thread_model = ThreadModel.PARALLEL

    @property
    def thread_model(self) -> ThreadModel:
        """The most this layer allows (the chain takes the minimum of all layers)."""
        return ThreadModel.PARALLEL

    def passes_plain_requests(self) -> bool:
        """This layer hands plain READs and WRITEs to the next one untouched, so the
        compiled request loop may call the plugin directly (it never skips a layer that
        looks at them)."""
        cls = type(self)
        return cls.pread is Backend.pread and cls.pwrite is Backend.pwrite

    # --- process-wide ---------------------------------------------------------------------
    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        """A ``key=value`` of the command line: take the filter's own keys, pass the rest
        on with ``next`` (they end at the plugin)."""
        next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        """Every key was given: check this layer's configuration, then ``next()``."""
        next()

    def get_ready(self) -> None:
        """The chain below is ready; this layer may now refuse to start (StartupError)."""

    def after_fork(self) -> None:
        """The server listens and has daemonised."""

    def cleanup(self) -> None:
        """The server stops serving (nbdkit's .cleanup); called once per layer."""

    def unload(self) -> None:
        """Last call before the layer goes away (nbdkit's .unload)."""

    # --- before a handle exists (the handshake) -------------------------------------------
    def preconnect(self, next: Context, readonly: bool) -> None:
        next.preconnect(readonly)

    def list_exports(self, next: Context, readonly: bool,
                     is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        return next.list_exports(readonly, is_tls)

    def default_export(self, next: Context, readonly: bool, is_tls: bool) -> bytes | None:
        return next.default_export(readonly, is_tls)

    def open(self, next: Context, readonly: bool) -> Handle:
        """Open the next layer, then this one; the result is this layer's handle."""
        next.open(readonly)
        return None

    def close(self, next: Context, h: Handle) -> None:
        next.close()

    # --- capabilities (asked once per connection, by backend/context.py) ------------------
    def get_size(self, next: Context, h: Handle) -> int:
        return next.get_size()

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        return next.block_size()

    def export_description(self, next: Context, h: Handle) -> bytes | None:
        return next.export_description()

    def can_write(self, next: Context, h: Handle) -> bool:
        return next.can_write()

    def can_flush(self, next: Context, h: Handle) -> bool:
        return next.can_flush()

    def is_rotational(self, next: Context, h: Handle) -> bool:
        return next.is_rotational()

    def can_trim(self, next: Context, h: Handle) -> bool:
        return next.can_trim()

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        return next.can_zero()

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        return next.can_fast_zero()

    def can_extents(self, next: Context, h: Handle) -> bool:
        return next.can_extents()

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        return next.can_fua()

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        return next.can_multi_conn()

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        return next.can_cache()

    # --- data -----------------------------------------------------------------------------
    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        next.pwrite(buf, offset, flags)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        next.flush(flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        return next.extents(count, offset, flags)


class Context(ContextMeta):
    """One layer's state for one connection (nbdkit ``struct context``): the layer, its
    handle, and the next layer's context.  Its methods are what a filter calls as ``next``."""

    __slots__ = ("backend", "handle", "next")

    def __init__(self, backend: Backend, next: Context | None) -> None:
        self.backend = backend
        self.next = next
        self.handle: Handle = None

    def _next(self) -> Context:
        assert self.next is not None, "the plugin layer has no next layer"
        return self.next

    def preconnect(self, readonly: bool) -> None:
        self.backend.preconnect(self._next(), readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        return self.backend.list_exports(self._next(), readonly, is_tls)

    def default_export(self, readonly: bool, is_tls: bool) -> bytes | None:
        return self.backend.default_export(self._next(), readonly, is_tls)

    def open(self, readonly: bool) -> None:
        self.handle = self.backend.open(self._next(), readonly)

    def close(self) -> None:
        self.backend.close(self._next(), self.handle)

    def get_size(self) -> int:
        return self.backend.get_size(self._next(), self.handle)

    def block_size(self) -> tuple[int, int, int] | None:
        return self.backend.block_size(self._next(), self.handle)

    def export_description(self) -> bytes | None:
        return self.backend.export_description(self._next(), self.handle)

    def can_write(self) -> bool:
        return self.backend.can_write(self._next(), self.handle)

    def can_flush(self) -> bool:
        return self.backend.can_flush(self._next(), self.handle)

    def is_rotational(self) -> bool:
        return self.backend.is_rotational(self._next(), self.handle)

    def can_trim(self) -> bool:
        return self.backend.can_trim(self._next(), self.handle)

    def can_zero(self) -> ZeroMode:
        return self.backend.can_zero(self._next(), self.handle)

    def can_fast_zero(self) -> bool:
        return self.backend.can_fast_zero(self._next(), self.handle)

    def can_extents(self) -> bool:
        return self.backend.can_extents(self._next(), self.handle)

    def can_fua(self) -> FuaMode:
        return self.backend.can_fua(self._next(), self.handle)

    def can_multi_conn(self) -> bool:
        return self.backend.can_multi_conn(self._next(), self.handle)

    def can_cache(self) -> CacheMode:
        return self.backend.can_cache(self._next(), self.handle)

    def pread(self, count: int, offset: int, flags: int) -> bytes | memoryview:
        return self.backend.pread(self._next(), self.handle, count, offset, flags)

    def pwrite(self, buf: bytes, offset: int, flags: int) -> None:
        self.backend.pwrite(self._next(), self.handle, buf, offset, flags)

    def flush(self, flags: int) -> None:
        self.backend.flush(self._next(), self.handle, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.backend.trim(self._next(), self.handle, count, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.backend.zero(self._next(), self.handle, count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.backend.cache(self._next(), self.handle, count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        return self.backend.extents(self._next(), self.handle, count, offset, flags)


class PluginContext(PluginContextMeta, Context):
    """The last layer's context: calls go straight to the plugin (one call less per
    request than going through :class:`PluginBackend`)."""

    __slots__ = ("asked", "next_extents", "plugin")

    def __init__(self, plugin: Plugin) -> None:
        super().__init__(PluginBackend(plugin), None)
        self.plugin = plugin
        #: The plugin's can_extents, once asked (nbdkit asks once per connection).
        self.next_extents: bool | None = None
        #: The plugin's answers to the capability questions: each is asked once per
        #: connection however many layers ask (nbdkit backend.c keeps them in the context).
        self.asked: dict[str, Any] = {}

    def _once(self, name: str) -> Any:
        if name not in self.asked:
            self.asked[name] = getattr(self.plugin, name)(self.handle)
        return self.asked[name]

    def preconnect(self, readonly: bool) -> None:
        self.plugin.preconnect(readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        return self.plugin.list_exports(readonly, is_tls)

    def default_export(self, readonly: bool, is_tls: bool) -> bytes | None:
        return self.plugin.default_export(readonly, is_tls)

    def open(self, readonly: bool) -> None:
        self.asked = {}
        self.handle = self.plugin.open(readonly)

    def close(self) -> None:
        self.plugin.close(self.handle)

    def get_size(self) -> int:
        return self.plugin.get_size(self.handle)

    def block_size(self) -> tuple[int, int, int] | None:
        return self.plugin.block_size(self.handle)

    def export_description(self) -> bytes | None:
        return self.plugin.export_description(self.handle)

    def can_write(self) -> bool:
        return bool(self._once("can_write"))

    def can_flush(self) -> bool:
        return bool(self._once("can_flush"))

    def is_rotational(self) -> bool:
        return bool(self._once("is_rotational"))

    def can_trim(self) -> bool:
        return bool(self._once("can_trim"))

    def can_zero(self) -> ZeroMode:
        return ZeroMode.NATIVE if self._once("can_zero") else ZeroMode.EMULATE

    def can_fast_zero(self) -> bool:
        return bool(self._once("can_fast_zero"))

    def can_extents(self) -> bool:
        self.next_extents = bool(self._once("can_extents"))
        return self.next_extents

    def can_fua(self) -> FuaMode:
        return FuaMode(self._once("can_fua"))

    def can_multi_conn(self) -> bool:
        return bool(self._once("can_multi_conn"))

    def can_cache(self) -> CacheMode:
        return CacheMode(self._once("can_cache"))

    def pread(self, count: int, offset: int, flags: int) -> bytes | memoryview:
        return self.plugin.pread(self.handle, count, offset, flags)

    def _fua_emulated(self) -> bool:
        """A filter's FUA, for a plugin without native FUA: flush after (nbdkit plugins.c)."""
        return self.can_fua() is not FuaMode.NATIVE

    def pwrite(self, buf: bytes, offset: int, flags: int) -> None:
        emulated = flags & FLAG_FUA and self._fua_emulated()
        self.plugin.pwrite(self.handle, buf, offset, flags & ~FLAG_FUA if emulated else flags)
        if emulated:
            self.plugin.flush(self.handle, 0)

    def flush(self, flags: int) -> None:
        self.plugin.flush(self.handle, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        emulated = flags & FLAG_FUA and self._fua_emulated()
        self.plugin.trim(self.handle, count, offset, flags & ~FLAG_FUA if emulated else flags)
        if emulated:
            self.plugin.flush(self.handle, 0)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if self._once("can_zero"):
            try:
                emulated = flags & FLAG_FUA and self._fua_emulated()
                self.plugin.zero(self.handle, count, offset,
                                 flags & ~FLAG_FUA if emulated else flags)
                if emulated:
                    self.plugin.flush(self.handle, 0)
                return
            except PluginError as err:
                # ENOTSUP/EOPNOTSUPP: "emulate me", unless fast, which emulation never is.
                if flags & FLAG_FAST_ZERO or err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        elif flags & FLAG_FAST_ZERO:
            raise FastZeroRefused
        # Emulated below the filters, as nbdkit plugins.c: they see a zero, not writes.
        while count:
            chunk = min(count, _ZERO_CHUNK)
            self.plugin.pwrite(self.handle, _ZEROES if chunk == _ZERO_CHUNK else
                               _ZEROES[:chunk], offset, 0)
            offset += chunk
            count -= chunk
        if flags & FLAG_FUA:
            self.plugin.flush(self.handle, 0)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.plugin.cache(self.handle, count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        if self.next_extents is None:  # a filter that never asked
            self.can_extents()
        if not self.next_extents:
            # A filter asks a plugin without extents: all of it is data (nbdkit backend.c).
            return [(offset, count, 0)]
        return self.plugin.extents(self.handle, count, offset, flags)


class PluginBackend(Backend):
    """The plugin as the last layer (nbdkit ``plugins.c``); its context is a
    :class:`PluginContext`, which calls the plugin itself."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.name = "plugin"

    @property
    def thread_model(self) -> ThreadModel:
        return self.plugin.thread_model

    def cleanup(self) -> None:
        self.plugin.cleanup()

    def unload(self) -> None:
        self.plugin.unload()


class Chain:
    """The layers a request goes through: ``filters`` (first = nearest the server), then
    the plugin."""

    def __init__(self, plugin: Plugin, filters: Sequence[Backend] = ()) -> None:
        self.plugin = plugin
        self.filters = tuple(filters)

    @property
    def thread_model(self) -> ThreadModel:
        """nbdkit: the chain runs under the most restrictive thread model of its layers
        (asked when serving starts: a Lua script's is known after config_complete)."""
        models = [f.thread_model for f in self.filters] + [self.plugin.thread_model]
        return ThreadModel(min(models))

    def config(self, key: str, value: str, plugin_config: Callable[[str, str], None]) -> None:
        """Route one ``key=value`` from the first filter on; what no filter takes reaches
        ``plugin_config``."""
        self._config_from(0, plugin_config)(key, value)

    def _config_from(self, i: int,
                     plugin_config: Callable[[str, str], None]) -> Callable[[str, str], None]:
        if i == len(self.filters):
            return plugin_config
        layer, rest = self.filters[i], self._config_from(i + 1, plugin_config)
        return lambda key, value: layer.config(rest, key, value)

    def config_complete(self, plugin_config_complete: Callable[[], None]) -> None:
        """Each filter's config_complete from the first on; the last ``next()`` is the
        plugin's."""
        self._config_complete_from(0, plugin_config_complete)()

    def _config_complete_from(self, i: int, last: Callable[[], None]) -> Callable[[], None]:
        if i == len(self.filters):
            return last
        layer, rest = self.filters[i], self._config_complete_from(i + 1, last)
        return lambda: layer.config_complete(rest)

    def get_ready(self) -> None:
        """Filters from the one nearest the plugin outwards, after the plugin (nbdkit)."""
        model = self.thread_model
        for layer in reversed(self.filters):
            layer.chain_thread_model = model
            layer.get_ready()

    def after_fork(self) -> None:
        for layer in reversed(self.filters):
            layer.after_fork()

    def with_plugin(self, plugin: Plugin) -> Chain:
        """The same filters in front of another instance of the plugin (a connection's own
        Lua state)."""
        return Chain(plugin, self.filters)

    def connect(self) -> Context:
        """Fresh per-connection contexts for every layer; the first layer's is returned."""
        top: Context = PluginContext(self.plugin)
        for f in reversed(self.filters):
            top = Context(f, top)
        return top

    def compiled_calls(self) -> CompiledCalls | None:
        """The plugin, when the compiled request loop may call it directly for plain
        READ/WRITE: every filter passes those untouched and the plugin offers the calls."""
        plugin = self.plugin if all(f.passes_plain_requests() for f in self.filters) else None
        return plugin if isinstance(plugin, CompiledCalls) else None

    def payload_buffers(self) -> PayloadBuffers | None:
        """The plugin, if it holds big WRITE payloads itself and no filter touches WRITEs."""
        plugin = self.plugin if all(f.passes_plain_requests() for f in self.filters) else None
        return plugin if isinstance(plugin, PayloadBuffers) else None

    def cleanup(self) -> None:
        for f in self.filters:
            f.cleanup()
        self.plugin.cleanup()

    def unload(self) -> None:
        for f in self.filters:
            f.unload()
        self.plugin.unload()


def bottom(context: Context) -> Context:
    """The plugin layer's context (the handle the compiled loop passes to the plugin)."""
    while context.next is not None:
        context = context.next
    return context
