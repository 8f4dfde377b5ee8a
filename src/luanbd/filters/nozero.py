"""nbdkit-nozero-filter(1): how WRITE_ZEROES reaches the plugin
(``zeromode=none|emulate|notrim|plugin``, ``fastzeromode=default|none|slow|ignore``)."""

from __future__ import annotations

import enum
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FastZeroRefused,
    FuaMode,
    Handle,
    PluginError,
    StartupError,
    ZeroMode,
)

#: Zeroes are written at most this much per pwrite (nbdkit's MAX_WRITE is 64 MiB; a
#: smaller chunk keeps a Lua plugin from allocating a huge string).
_CHUNK = 1024 * 1024
_ZEROES = bytes(_CHUNK)


class Mode(enum.Enum):
    NONE = "none"
    EMULATE = "emulate"
    NOTRIM = "notrim"
    PLUGIN = "plugin"


class FastZeroMode(enum.Enum):
    DEFAULT = "default"
    NONE = "none"
    SLOW = "slow"
    IGNORE = "ignore"


class Filter(Backend):
    name = "nozero"
    config_help = ("zeromode=<MODE>      One of 'none' (default), 'emulate', 'notrim', "
                   "'plugin'.\n"
                   "fastzeromode=<MODE>  One of 'default', 'none', 'slow', 'ignore'.")

    def __init__(self) -> None:
        self.zeromode = Mode.NONE
        self.fastzeromode = FastZeroMode.DEFAULT

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "zeromode":
            try:
                self.zeromode = Mode(value)
            except ValueError:
                raise StartupError(f"unknown zeromode '{value}'") from None
        elif key == "fastzeromode":
            try:
                self.fastzeromode = FastZeroMode(value)
            except ValueError:
                raise StartupError(f"unknown fastzeromode '{value}'") from None
        else:
            next(key, value)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        # nbdkit's .prepare: the modes that forward zero need zero below (a plugin without
        # zero has it emulated, which is enough, as in nbdkit).
        if (not readonly and self.zeromode in (Mode.NOTRIM, Mode.PLUGIN)
                and next.can_zero() is ZeroMode.NONE):
            next.close()
            raise PluginError("open", f"zeromode '{self.zeromode.value}' requires plugin "
                                      "zero support", bare=True)
        return None

    def can_zero(self, next: Context, h: Handle) -> ZeroMode:
        if self.zeromode is Mode.NONE:
            return ZeroMode.NONE
        if self.zeromode is Mode.EMULATE:
            # NATIVE, though: our zero writes zeroes with pwrite, so the plugin's zero is
            # never used, and nbdkit's ENOTSUP answer to a fast zero is ours to give.
            return ZeroMode.NATIVE
        return next.can_zero()

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        if self.zeromode is Mode.NONE:
            return False
        if self.zeromode is not Mode.EMULATE and self.fastzeromode is FastZeroMode.DEFAULT:
            return next.can_fast_zero()
        return self.fastzeromode is not FastZeroMode.NONE

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if flags & FLAG_FAST_ZERO:
            # Emulated zeroes are never fast (nbdkit refuses them whatever fastzeromode,
            # before the filter's zero).
            if self.fastzeromode is FastZeroMode.SLOW or self.zeromode is Mode.EMULATE:
                raise FastZeroRefused
            if self.fastzeromode is FastZeroMode.IGNORE:
                flags &= ~FLAG_FAST_ZERO
        if self.zeromode is Mode.NOTRIM:
            flags &= ~FLAG_MAY_TRIM
        if self.zeromode is not Mode.EMULATE:
            next.zero(count, offset, flags)
            return
        writeflags = 0
        need_flush = False
        if flags & FLAG_FUA:
            if next.can_fua() is FuaMode.EMULATE:
                need_flush = True
            else:
                writeflags = FLAG_FUA
        while count:
            size = min(count, _CHUNK)
            next.pwrite(_ZEROES if size == _CHUNK else _ZEROES[:size], offset, writeflags)
            offset += size
            count -= size
        if need_flush:
            # nbdkit passes FUA with the last pwrite, and the plugin layer, whose FUA is
            # emulated, flushes after it: the same, said here.
            next.flush(0)
