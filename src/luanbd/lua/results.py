"""Callback results: what a call through nbdkit.lua's wrapper returned, turned into the
value a :class:`luanbd.backend.interface.Plugin` method answers, or the PluginError it stands
for.

The wrapper returns ``(true, results...)`` or ``(false, message, errno)``.  A callback's
answer of the wrong kind fails that call with a PluginError (logged, and the request gets
an error), never with a Python traceback.  ``g`` is the script's globals, looked up at each
use: its ``tonumber``/``tostring`` do Lua's own conversions.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from typing import Any

from luanbd.backend.interface import PluginError


def text(value: Any) -> str:
    """A Lua string (bytes) or number as text, for messages."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def values(res: Any) -> tuple[Any, ...]:
    """The results of a Lua call as a tuple (lupa returns one result bare)."""
    return res if isinstance(res, tuple) else (res,)


def unwrap(name: str, res: Any) -> tuple[Any, ...]:
    """All results of a wrapped call ``(true, ...)``, or raise for ``(false, msg, errno)``."""
    results = values(res)
    if results[0]:
        return results[1:]
    raise PluginError(name, text(results[1]), int(results[2] or errno.EIO))


def first(name: str, res: Any) -> Any:
    """The first result of a wrapped call, or the PluginError it stands for."""
    results = unwrap(name, res)
    return results[0] if results else None


def boolean(name: str, value: Any) -> bool:
    """A can_* or is_* answer."""
    if not isinstance(value, bool):
        raise PluginError(name, "return value is not a boolean")
    return value


def integer(name: str, value: Any, g: Any) -> int:
    """A size or offset: a Lua integer, an integral float or a numeric string."""
    if isinstance(value, bool):
        raise PluginError(name, "cannot convert returned value to an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and abs(value) < 2**63:
        return int(value)
    if isinstance(value, bytes):
        number = g.tonumber(value)
        if number is not None:
            return integer(name, number, g)
    raise PluginError(name, "cannot convert returned value to an integer")


def mode(name: str, value: Any) -> int:
    """A can_fua or can_cache answer: nbdkit's _NONE, _EMULATE or _NATIVE."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2):
        raise PluginError(name, "return value is not one of nbdkit."
                                f"{name[4:].upper()}_NONE, _EMULATE or _NATIVE")
    return value


def optional_string(name: str, value: Any) -> bytes | None:
    """A default_export or export_description answer: a string or nil."""
    if value is None or isinstance(value, bytes):
        return value
    raise PluginError(name, "return value is not a string")


def exports(value: Any, lua_type: Callable[[Any], str]) -> list[tuple[bytes, bytes | None]]:
    """A list_exports answer: a sequence of names or {name=..., description=...}."""
    if lua_type(value) != "table":
        raise PluginError("list_exports", "return value is not a table")
    found: list[tuple[bytes, bytes | None]] = []
    for i in range(1, len(value) + 1):
        item = value[i]
        if isinstance(item, bytes):
            found.append((item, None))
        elif lua_type(item) == "table" and isinstance(item[b"name"], bytes):
            desc = item[b"description"]
            found.append((item[b"name"], desc if isinstance(desc, bytes) else None))
        else:
            raise PluginError("list_exports",
                              f"item {i} is not a name or a {{name=..., description=...}}")
    return found


def block_size(results: tuple[Any, ...], g: Any) -> tuple[int, int, int] | None:
    """A block_size answer: minimum, preferred, maximum (all 0: no constraints)."""
    if len(results) != 3:
        raise PluginError("block_size", "expected 3 return values: minimum, preferred, "
                                        "maximum")
    minimum, preferred, maximum = (integer("block_size", v, g) for v in results)
    if (minimum, preferred, maximum) == (0, 0, 0):
        return None
    if maximum == -1:  # nbdkit's (uint32_t)-1: no maximum beyond the protocol's
        maximum = 0xFFFFFFFF
    problem = block_size_problem(minimum, preferred, maximum)
    if problem is not None:
        raise PluginError("block_size", f"plugin must set {problem} (minimum={minimum} "
                                        f"preferred={preferred} maximum={maximum})")
    return minimum, preferred, maximum


def block_size_problem(minimum: int, preferred: int, maximum: int) -> str | None:
    """What is wrong with a block_size answer that is not (0, 0, 0), in nbdkit's order and
    words (server/plugins.c), or None.  Lua integers are 64 bits where nbdkit's are 32: a
    negative value or a maximum of 2^32 or more is refused too (2^33 used to pass here and
    fail as an internal error while NBD_INFO_BLOCK_SIZE was packed)."""
    if not 1 <= minimum <= 65536:
        return "minimum block size between 1 and 64K"
    if not _pow2(minimum):
        return "minimum block size to a power of 2"
    if not _pow2(preferred):
        return "preferred block size to a power of 2"
    if not 512 <= preferred <= 32 * 1024 * 1024:
        return "preferred block size between 512 and 32M"
    if not 0 <= maximum <= 0xFFFFFFFF:
        return "maximum block size to -1 or a value below 2^32"
    if maximum != 0xFFFFFFFF and maximum % minimum != 0:
        return "maximum block size to -1 or a multiple of minimum block size"
    if not minimum <= preferred <= maximum:
        return "minimum block size <= preferred <= maximum"
    return None


def extents(value: Any, lua_type: Callable[[Any], str], g: Any,
            name: str = "extents") -> list[tuple[int, int, int]]:
    """An extents (or meta_extents) answer: a sequence of {offset, length, type} (or those
    named fields)."""
    if lua_type(value) != "table":
        raise PluginError(name, "return value is not a table")
    out = []
    for i in range(1, len(value) + 1):
        item = value[i]
        if lua_type(item) != "table":
            raise PluginError(name, f"extent {i} is not a table")
        fields = [item[1], item[2], item[3]]
        if fields[0] is None:
            fields = [item[b"offset"], item[b"length"], item[b"type"]]
        if fields[2] is None:
            fields[2] = 0
        try:
            e_offset, e_length, e_type = (integer(name, v, g) for v in fields)
        except PluginError:
            raise PluginError(name, f"extent {i} must be {{offset, length, type}} "
                                         f"with integers") from None
        out.append((e_offset, e_length, e_type))
    return out


def context_names(value: Any, lua_type: Callable[[Any], str]) -> list[bytes]:
    """A meta_contexts answer: a sequence of context names."""
    if lua_type(value) != "table":
        raise PluginError("meta_contexts", "return value is not a table")
    found = []
    for i in range(1, len(value) + 1):
        item = value[i]
        if not isinstance(item, bytes):
            raise PluginError("meta_contexts", f"item {i} is not a string")
        found.append(item)
    return found


def pread_data(res: Any, count: int, g: Any) -> bytes | memoryview:
    """A pread result that is not simply ``(true, string of count bytes)``: a longer string
    is cut, a number becomes its text, anything else is the callback's error."""
    if res.__class__ is tuple and res[0] is True and len(res) > 1:
        value = res[1]
        if value.__class__ is bytes and len(value) == count:
            return value
    elif res is True or not res[0]:
        value = first("pread", res)
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
        return pread_number(value, count, g)
    raise PluginError("pread", "return value is not a string")


def pread_number(value: float, count: int, g: Any) -> bytes:
    """A number a pread returned, as the string Lua makes of it."""
    data = g.tostring(value)
    if len(data) < count:
        raise PluginError("pread", "returned string length < count bytes")
    return bytes(data[:count])


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
