"""The nbdkit plugin API (nbdkit-plugin(3), API version 2) as a Python interface.

A :class:`Plugin` answers every capability question itself, with the defaults that
nbdkit's ``server/plugins.c`` derives from which callbacks exist, so the layer above only
does emulation (``backend/context.py``).  Flags passed to data calls use nbdkit's values
(``FLAG_MAY_TRIM`` ...), not the NBD wire values.
"""

from __future__ import annotations

import enum
import errno as _errno
from typing import Any, Protocol, runtime_checkable

#: nbdkit-plugin(3) flag values passed to data callbacks.
FLAG_MAY_TRIM = 1 << 0
FLAG_FUA = 1 << 1
FLAG_REQ_ONE = 1 << 2
FLAG_FAST_ZERO = 1 << 3

#: Extent types (nbdkit ``NBDKIT_EXTENT_*``), the same bits as base:allocation.
EXTENT_HOLE = 1 << 0
EXTENT_ZERO = 1 << 1

Handle = Any


class ThreadModel(enum.IntEnum):
    """nbdkit thread models, from the most to the least restrictive."""

    SERIALIZE_CONNECTIONS = 0
    SERIALIZE_ALL_REQUESTS = 1
    SERIALIZE_REQUESTS = 2
    PARALLEL = 3

    def __str__(self) -> str:
        return self.name.lower()


class FuaMode(enum.IntEnum):
    """Answer of ``can_fua``."""

    NONE = 0
    EMULATE = 1
    NATIVE = 2


class ZeroMode(enum.IntEnum):
    """A layer's ``can_zero`` in the chain (nbdkit's three answers): NONE, not advertised at
    all; EMULATE, done with pwrite of zeroes; NATIVE, the layer's zero.  (A plugin's
    ``can_zero`` is a bool: false means EMULATE, as in nbdkit.)"""

    NONE = 0
    EMULATE = 1
    NATIVE = 2


class CacheMode(enum.IntEnum):
    """Answer of ``can_cache``."""

    NONE = 0
    EMULATE = 1
    NATIVE = 2


class PluginError(Exception):
    """A plugin callback failed.  ``message`` is what the log shows after ``<callback>: ``."""

    def __init__(self, callback: str, message: str, errno: int = _errno.EIO, *,
                 bare: bool = False) -> None:
        # bare: the message stands alone in the log (nbdkit's own server-side checks).
        super().__init__(message if bare else f"{callback}: {message}")
        self.callback = callback
        self.message = message
        self.errno = errno


class FastZeroRefused(PluginError):
    """A fast zero that could only be emulated: ENOTSUP at once, as the client asked.

    This is the protocol working as designed, so it is not logged as an error.
    """

    def __init__(self) -> None:
        super().__init__("zero", "fast zero is not supported", _errno.ENOTSUP)


class LoggedError(PluginError):
    """A failure whose messages a filter has logged itself (in nbdkit, with nbdkit_error as
    it went): the server answers the request with its errno and logs nothing more."""


class StartupError(Exception):
    """The plugin cannot start (bad script, bad configuration): one log line, exit status 1."""


class Plugin(Protocol):
    """What the server needs from a plugin.  Every method may raise :class:`PluginError`."""

    thread_model: ThreadModel

    def cleanup(self) -> None: ...
    def unload(self) -> None: ...
    def preconnect(self, readonly: bool) -> None: ...
    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[bytes, bytes | None]]: ...
    def default_export(self, readonly: bool, is_tls: bool) -> bytes | None: ...
    def open(self, readonly: bool) -> Handle: ...
    def close(self, h: Handle) -> None: ...

    def get_size(self, h: Handle) -> int: ...
    def block_size(self, h: Handle) -> tuple[int, int, int] | None: ...
    def export_description(self, h: Handle) -> bytes | None: ...
    def can_write(self, h: Handle) -> bool: ...
    def can_flush(self, h: Handle) -> bool: ...
    def is_rotational(self, h: Handle) -> bool: ...
    def can_trim(self, h: Handle) -> bool: ...
    def can_zero(self, h: Handle) -> bool: ...
    def can_fast_zero(self, h: Handle) -> bool: ...
    def can_extents(self, h: Handle) -> bool: ...
    def can_fua(self, h: Handle) -> FuaMode: ...
    def can_multi_conn(self, h: Handle) -> bool: ...
    def can_cache(self, h: Handle) -> CacheMode: ...

    def pread(self, h: Handle, count: int, offset: int, flags: int) -> bytes | memoryview: ...
    def pwrite(self, h: Handle, buf: bytes, offset: int, flags: int) -> None: ...
    def flush(self, h: Handle, flags: int) -> None: ...
    def trim(self, h: Handle, count: int, offset: int, flags: int) -> None: ...
    def zero(self, h: Handle, count: int, offset: int, flags: int) -> None: ...
    def cache(self, h: Handle, count: int, offset: int, flags: int) -> None: ...
    def extents(self, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]: ...


@runtime_checkable
class PayloadBuffers(Protocol):
    """A plugin that can give a big WRITE payload its final home before it is received, so
    that the payload is never copied (the Lua plugin: a new Lua string)."""

    def payload_buffer(self, size: int) -> tuple[bytes, memoryview] | None:
        """(the payload its pwrite will be given, a writable view of its ``size`` bytes),
        or None for an ordinary ``bytes``.  Called under the request lock."""
        ...


@runtime_checkable
class CompiledCalls(Protocol):
    """A plugin whose plain small READ/WRITE the compiled request loop (server/_fastpath.c)
    may call without the Python layers in between (the Lua plugin is one)."""

    def fastpath_calls(self) -> tuple[Any, Any, Any, bool]:
        """(call, pread, pwrite or None, api2): the loop does ``call(pread, h, count, offset
        [, 0])`` or ``call(pwrite, h, buf, offset [, 0])`` (with the flags argument when
        api2) and takes a result of ``(True, bytes of count)`` / ``True`` / ``(True, ...)``
        as success; pwrite None leaves WRITEs to Python."""
        ...

    def fastpath_result(self, is_read: bool, res: Any, count: int) -> bytes | memoryview | None:
        """A result the loop did not take as success: the READ data, or raise PluginError."""
        ...
