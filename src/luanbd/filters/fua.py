"""nbdkit-fua-filter(1): how FUA and flush reach the plugin
(``fuamode=none|emulate|native|force|pass|discard``)."""

from __future__ import annotations

import enum
from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import FLAG_FUA, FuaMode, Handle, PluginError, StartupError


class Mode(enum.Enum):
    NONE = "none"
    EMULATE = "emulate"
    NATIVE = "native"
    FORCE = "force"
    PASS = "pass"
    DISCARD = "discard"


class Filter(Backend):
    name = "fua"
    config_help = ("fuamode=<MODE>       One of 'none' (default), 'emulate', 'native',\n"
                   "                       'force', 'pass'.")

    def __init__(self) -> None:
        self.mode = Mode.NONE

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key != "fuamode":
            next(key, value)
            return
        # nbdkit 1.32 lacks an "else" after its test for "none", so fuamode=none falls into
        # the chain of the other modes and is refused: the same here.
        if value == "none" or value not in Mode._value2member_map_:
            raise StartupError(f"unknown fuamode '{value}'")
        self.mode = Mode(value)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        # nbdkit's .prepare: the modes that rely on the plugin's flush or FUA.
        if not readonly:
            message = None
            if self.mode is Mode.EMULATE and not next.can_flush():
                message = "fuamode 'emulate' requires plugin flush support"
            elif (self.mode in (Mode.NATIVE, Mode.FORCE)
                  and next.can_fua() is FuaMode.NONE):
                # nbdkit's message names "force" for native too.
                message = "fuamode 'force' requires plugin fua support"
            if message is not None:
                next.close()
                raise PluginError("open", message, bare=True)
        return None

    def can_flush(self, next: Context, h: Handle) -> bool:
        if self.mode in (Mode.FORCE, Mode.DISCARD):
            return True  # our flush is a no-op, even if the plugin has none
        return next.can_flush()

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        if self.mode is Mode.NONE:
            return FuaMode.NONE
        if self.mode is Mode.EMULATE:
            return FuaMode.EMULATE
        if self.mode is Mode.PASS:
            return next.can_fua()
        return FuaMode.NATIVE

    def _flags(self, flags: int) -> tuple[int, bool]:
        """The flags to pass on, and whether to flush after the call."""
        if self.mode is Mode.EMULATE and flags & FLAG_FUA:
            return flags & ~FLAG_FUA, True
        if self.mode is Mode.FORCE:
            return flags | FLAG_FUA, False
        if self.mode is Mode.DISCARD:
            return flags & ~FLAG_FUA, False
        return flags, False

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        flags, need_flush = self._flags(flags)
        next.pwrite(buf, offset, flags)
        if need_flush:
            next.flush(0)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        if self.mode not in (Mode.FORCE, Mode.DISCARD):  # force: every write had FUA
            next.flush(flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        flags, need_flush = self._flags(flags)
        next.trim(count, offset, flags)
        if need_flush:
            next.flush(0)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        flags, need_flush = self._flags(flags)
        next.zero(count, offset, flags)
        if need_flush:
            next.flush(0)
