"""FUA and zero emulation done by a filter itself, on the next layer: the log and stats
filters answer FUA as native to the layers above and do the emulating flush themselves, so
their records show the client's request with its flag, as nbdkit's (whose plugin layer
emulates both below every filter, as luanbd's PluginContext does too, backend/chain.py)."""

from __future__ import annotations

import errno
from collections.abc import Callable

from luanbd.backend.chain import Context
from luanbd.backend.context import ZERO_EMULATION_CHUNK
from luanbd.backend.interface import FLAG_FAST_ZERO, FLAG_FUA, FuaMode, PluginError


def fua_above(mode: FuaMode) -> FuaMode:
    """What the filter answers for can_fua when the next layer answers ``mode``: it does the
    emulation itself, so FUA is native from above."""
    return FuaMode.NATIVE if mode is FuaMode.EMULATE else mode


def with_fua(next: Context, mode: FuaMode, flags: int, call: Callable[[int], None]) -> None:
    """``call(flags)``; a FUA the next layer only emulates: without the flag, then a flush."""
    if flags & FLAG_FUA and mode is FuaMode.EMULATE:
        call(flags & ~FLAG_FUA)
        next.flush(0)
    else:
        call(flags)


def zero_or_emulate(next: Context, count: int, offset: int, flags: int) -> None:
    """The next layer's zero; where it cannot (ENOTSUP, not a fast zero), zeroes written."""
    try:
        next.zero(count, offset, flags)
        return
    except PluginError as err:
        if flags & FLAG_FAST_ZERO or err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    while count:
        chunk = min(count, ZERO_EMULATION_CHUNK)
        next.pwrite(bytes(chunk), offset, flags & FLAG_FUA)
        offset += chunk
        count -= chunk
