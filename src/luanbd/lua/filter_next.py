"""What a Lua filter's ``next`` does in Python: the primitives behind filter.lua's ``next``
object, and the errors of the next layer carried through the filter's Lua code.

Each primitive answers ``(true, results...)`` or ``(false, message, errno)``.  The failed
call's exception is kept (per thread) by :class:`Pending`; when the filter's callback then
fails with the same message (it did not catch the error, or raised it again), the kept
exception is what the layer above gets: same class, message and errno.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

from luanbd.backend.chain import Context
from luanbd.backend.interface import PluginError, StartupError


class Pending:
    """The last failure of a next-layer call, per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def fail(self, call: str, exc: BaseException) -> tuple[bool, bytes, int]:
        if isinstance(exc, PluginError):
            message, code = exc.message, exc.errno
        elif isinstance(exc, StartupError):
            message, code = str(exc), errno.EINVAL
        else:
            # A bug below must not escape as a traceback: it is that call's EIO.
            message, code = f"{type(exc).__name__}: {exc}", errno.EIO
            exc = PluginError(call, message, code)
        self._local.kept = (exc, message)
        return False, message.encode("utf-8", "replace"), code

    def take(self, err: PluginError) -> BaseException:
        """What to raise for a failed filter callback ``err``."""
        kept: tuple[BaseException, str] | None = getattr(self._local, "kept", None)
        self._local.kept = None
        if kept is not None and kept[1] == err.message:
            return kept[0]
        return err

    def guard(self, fn: Callable[..., Any], call: str = "next") -> Callable[..., Any]:
        """``fn`` as a primitive: its result after ``true``, or its failure kept."""
        def primitive(*args: Any) -> Any:
            try:
                value = fn(*args)
            except Exception as exc:
                return self.fail(call, exc)
            return True, value
        return primitive


class NextLayer:
    """The next layer of one connection, as one Lua filter sees it: opened at most once,
    and requests checked against its size (nbdkit asserts; here they fail with EINVAL)."""

    __slots__ = ("context", "opened", "size")

    def __init__(self, context: Context) -> None:
        self.context = context
        self.opened = False
        self.size = -1

    def open(self, readonly: bool) -> None:
        if self.opened:
            raise PluginError("open", "the next layer is already open", errno.EINVAL)
        self.context.open(readonly)
        self.opened = True

    def get_size(self) -> int:
        if self.size < 0:
            self.size = self.context.get_size()
        return self.size

    def check(self, call: str, count: int, offset: int) -> None:
        if count < 0 or offset < 0 or offset + count > self.get_size():
            raise PluginError(call, f"next:{call}: count {count} at offset {offset} is "
                                    f"outside the next layer (size {self.size})",
                              errno.EINVAL)


def primitives(pending: Pending, runtime: Any) -> dict[str, Callable[..., Any]]:
    """filter.lua's ``py`` table: each takes the connection's :class:`NextLayer` first."""
    def prim(call: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def primitive(below: NextLayer, *args: Any) -> Any:
            try:
                if not below.opened:
                    raise PluginError(call, f"next:{call} called before the next layer was "
                                            f"opened", errno.EINVAL)
                value = fn(below, *args)
            except Exception as exc:
                return pending.fail(call, exc)
            if value.__class__ is tuple:
                return (True, *value)
            return True, value
        return primitive

    def pread(below: NextLayer, count: Any, offset: Any, flags: Any) -> bytes:
        count, offset = int(count), int(offset)
        below.check("pread", count, offset)
        return bytes(below.context.pread(count, offset, int(flags)))

    def pwrite(below: NextLayer, buf: bytes, offset: Any, flags: Any) -> None:
        offset = int(offset)
        below.check("pwrite", len(buf), offset)
        below.context.pwrite(buf, offset, int(flags))

    def ranged(call: str) -> Callable[..., Any]:
        def request(below: NextLayer, count: Any, offset: Any, flags: Any) -> None:
            count, offset = int(count), int(offset)
            below.check(call, count, offset)
            getattr(below.context, call)(count, offset, int(flags))
        return request

    def extents(below: NextLayer, count: Any, offset: Any, flags: Any) -> Any:
        count, offset = int(count), int(offset)
        below.check("extents", count, offset)
        flat: list[int] = []
        for e in below.context.extents(count, offset, int(flags)):
            flat += e
        return runtime.table_from(flat)

    def block_size(below: NextLayer) -> tuple[int, int, int]:
        return below.context.block_size() or (0, 0, 0)

    def query(call: str, convert: Callable[[Any], Any]) -> Callable[..., Any]:
        return lambda below: convert(getattr(below.context, call)())

    table: dict[str, Callable[..., Any]] = {
        "pread": pread, "pwrite": pwrite, "extents": extents, "block_size": block_size,
        "flush": lambda below, flags: below.context.flush(int(flags)),
        "get_size": NextLayer.get_size,
        "export_description": query("export_description", lambda v: v),
    }
    for call in ("trim", "zero", "cache"):
        table[call] = ranged(call)
    for call in ("can_write", "can_flush", "is_rotational", "can_trim", "can_fast_zero",
                 "can_extents", "can_multi_conn"):
        table[call] = query(call, bool)
    for call in ("can_zero", "can_fua", "can_cache"):
        table[call] = query(call, int)
    out = {name: prim(name, fn) for name, fn in table.items()}
    out["open"] = pending.guard(lambda below, readonly: below.open(bool(readonly)), "open")
    return out
