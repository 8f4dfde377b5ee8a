"""The compiled request loop's calls for a chain whose filters look at plain READs and
WRITEs (server/compiled.py): each request goes down the chain from its first layer, as
BackendContext.pread/pwrite send a plain request (no flags, under the same lock); only the
request loop around it is compiled.  Results come back in the shape of a Lua call through
nbdkit.lua's wrapper, which is what the loop reads: ``(True, data)`` or ``(False, error)``.
"""

from __future__ import annotations

from typing import Any

from luanbd.backend.chain import Context
from luanbd.backend.interface import PluginError


def _call(fn: Any, handle: Any, a: Any, b: int, flags: int = 0) -> tuple[bool, Any]:
    """``fn(a, b, 0)``: a layer's pread(count, offset) or pwrite(data, offset)."""
    try:
        return True, fn(a, b, 0)
    except PluginError as err:
        return False, err


class ContextCalls:
    """CompiledCalls (backend/interface.py) for one connection's opened chain."""

    def __init__(self, top: Context) -> None:
        self.top = top

    def fastpath_calls(self) -> tuple[Any, Any, Any, bool]:
        return _call, self.top.pread, self.top.pwrite, True

    def fastpath_result(self, is_read: bool, res: Any, count: int) -> bytes | memoryview | None:
        """A result the loop did not take as plain success: a layer's memoryview or other
        data, or its PluginError raised again."""
        ok, value = res
        if not ok:
            raise value
        return value if is_read else None
