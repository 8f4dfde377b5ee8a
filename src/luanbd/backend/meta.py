"""Metadata contexts beyond ``base:allocation`` through the backend chain.

A plugin may serve contexts of its own (a Lua script's ``meta_contexts`` and
``meta_extents``) and a filter may add some (the cbt filter's ``qemu:dirty-bitmap:NAME``,
cow's ``qemu:allocation-depth``).  Which contexts a server offers is fixed at start-up, after
``get_ready``: negotiation lists them before any connection has opened the plugin.

The mixins here give :class:`~luanbd.backend.chain.Backend` and the per-connection contexts
their defaults, so backend/chain.py stays about base:allocation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from luanbd.backend.interface import Handle, Plugin, PluginError, StartupError
from luanbd.protocol.constants import BASE_ALLOCATION, MAX_STRING

if TYPE_CHECKING:
    from luanbd.backend.chain import Backend, Chain, Context

#: Raw extents as a layer answers them: (offset, length, flags).
RawExtents = list[tuple[int, int, int]]


class LayerMeta:
    """A filter layer's metadata contexts (mixin of Backend)."""

    __slots__ = ()

    #: Whether the contexts of the layers below reach the client through this one.  None:
    #: when the layer leaves extents, size and data layout alone (it overrides none of
    #: ``extents``, ``can_extents``, ``get_size``), since a layer that moves offsets would
    #: pass wrong answers up.  A filter that knows better says True or False.
    passes_meta_contexts: bool | None = None

    def meta_contexts(self, below: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """The contexts this layer serves, given those of the layers below it
        (base:allocation is never among them: the server always serves it)."""
        return below if _passes(self) else ()

    def meta_extents(self, next: Context, h: Handle, context: bytes,  # noqa: PLR0917
                     count: int, offset: int, flags: int) -> RawExtents:
        """Block status of ``context``, one of :meth:`meta_contexts`' names."""
        return next.meta_extents(context, count, offset, flags)


def _passes(layer: LayerMeta) -> bool:
    if layer.passes_meta_contexts is not None:
        return layer.passes_meta_contexts
    from luanbd.backend.chain import Backend

    cls = type(layer)
    return all(getattr(cls, name) is getattr(Backend, name)
               for name in ("extents", "can_extents", "get_size"))


class ContextMeta:
    """A layer's per-connection context: ``next.meta_extents`` (mixin of Context)."""

    __slots__ = ()
    backend: Backend
    handle: Handle

    def meta_extents(self, context: bytes, count: int, offset: int,
                     flags: int) -> RawExtents:
        result: RawExtents = self.backend.meta_extents(
            self._next(), self.handle, context, count, offset, flags)  # type: ignore[attr-defined]
        return result


class PluginContextMeta(ContextMeta):
    """The plugin layer's: the plugin's own ``meta_extents``."""

    __slots__ = ()
    plugin: Plugin

    def meta_extents(self, context: bytes, count: int, offset: int,
                     flags: int) -> RawExtents:
        answer = getattr(self.plugin, "meta_extents", None)
        if answer is None:
            raise PluginError("meta_extents", f"no metadata context {context!r} here")
        result: RawExtents = answer(self.handle, context, count, offset, flags)
        return result


def check_context_name(name: bytes, who: str) -> None:
    """A context a plugin or filter declares: ``namespace:leaf``, not in ``base:`` (the
    server's own), at most the spec's string length; StartupError otherwise."""
    namespace, colon, leaf = name.partition(b":")
    if not colon or not namespace or not leaf:
        raise StartupError(f"{who}: metadata context {name!r} is not namespace:name")
    if namespace == b"base":
        raise StartupError(f"{who}: metadata context {name!r}: the base: namespace is the "
                           f"server's (base:allocation is always served)")
    if len(name) > MAX_STRING:
        raise StartupError(f"{who}: metadata context name longer than {MAX_STRING} bytes")
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        raise StartupError(f"{who}: metadata context {name!r} is not UTF-8") from None


def chain_contexts(chain: Chain) -> tuple[bytes, ...]:
    """Every context the chain serves, base:allocation first (its id is 1): the plugin's,
    then each filter's from the one nearest the plugin outwards."""
    declared = getattr(chain.plugin, "meta_contexts", None)
    names: tuple[bytes, ...] = tuple(declared()) if declared is not None else ()
    who = "plugin"
    for layer in (None, *reversed(chain.filters)):
        if layer is not None:
            names = tuple(layer.meta_contexts(names))
            who = f"filter {layer.name}"
        seen: set[bytes] = set()
        for name in names:
            check_context_name(name, who)
            if name in seen:
                raise StartupError(f"{who}: metadata context {name!r} declared twice")
            seen.add(name)
    return (BASE_ALLOCATION, *names)
