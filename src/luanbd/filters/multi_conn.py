"""nbdkit-multi-conn-filter(1): what is advertised as NBD_FLAG_CAN_MULTI_CONN, and its
emulation: a flush on one connection flushes every connection (of the same export with
``multi-conn-exportname=true``) that may hold dirty data (``multi-conn-mode=auto|emulate|
plugin|disable|unsafe``, ``multi-conn-track-dirty=conn|fast|off``)."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FLAG_FUA,
    FuaMode,
    Handle,
    PluginError,
    StartupError,
    ThreadModel,
)
from luanbd.filters.emulate import fua_above, with_fua
from luanbd.filters.params import bool_parameter


class Mode(enum.Enum):
    AUTO = "auto"
    EMULATE = "emulate"
    PLUGIN = "plugin"
    UNSAFE = "unsafe"
    DISABLE = "disable"


class Track(enum.Enum):
    CONN = "conn"
    FAST = "fast"
    OFF = "off"


_TRACK = {"connection": Track.CONN, "conn": Track.CONN, "fast": Track.FAST, "off": Track.OFF}
#: What a connection may have left in a cache.
WRITE = 1
READ = 2


class _Group:
    """The connections whose flushes reach each other."""

    __slots__ = ("conns", "dirty", "name")

    def __init__(self, name: bytes | None) -> None:
        self.conns: list[_Conn] = []
        self.name = name
        self.dirty = False


class _Conn:
    __slots__ = ("dirty", "fua", "group", "mode", "next")

    def __init__(self, next: Context, mode: Mode, group: _Group) -> None:
        self.next = next
        self.mode = mode
        #: The next layer's can_fua, once the server asked ours (a writable connection).
        self.fua = FuaMode.NONE
        self.dirty = 0
        self.group = group


class Filter(Backend):
    name = "multi-conn"
    config_help = (
        "multi-conn-mode=<MODE>          'auto' (default), 'emulate', 'plugin',\n"
        "                                'disable', or 'unsafe'.\n"
        "multi-conn-track-dirty=<LEVEL>  'conn' (default), 'fast', or 'off'.\n"
        "multi-conn-exportname=<BOOL>    true to limit emulation by export name.")

    def __init__(self) -> None:
        self.mode = Mode.AUTO
        self.track = Track.CONN
        self.byname = False
        self._lock = threading.Lock()
        self._groups: list[_Group] = []

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "multi-conn-mode":
            try:
                self.mode = Mode(value)
            except ValueError:
                raise StartupError(f"unknown multi-conn mode '{value}'") from None
        elif key == "multi-conn-track-dirty":
            track = _TRACK.get(value)
            if track is None:
                raise StartupError(f"unknown multi-conn track-dirty setting '{value}'")
            self.track = track
        elif key in ("multi-conn-exportname", "multi-conn-export-name"):
            self.byname = bool_parameter(value)
        else:
            next(key, value)

    def get_ready(self) -> None:
        if self.chain_thread_model is ThreadModel.SERIALIZE_CONNECTIONS \
                and self.mode is Mode.AUTO:
            self.mode = Mode.DISABLE

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        try:
            return self._prepare(next)
        except BaseException:
            next.close()
            raise

    def _prepare(self, next: Context) -> _Conn:
        """nbdkit's .prepare: settle the mode and join the group."""
        mode = self.mode
        if mode is Mode.AUTO:
            mode = Mode.PLUGIN if next.can_multi_conn() else Mode.EMULATE
        if mode is Mode.EMULATE and not next.can_flush():
            raise PluginError("prepare", "emulating multi-conn requires working flush",
                              bare=True)
        name = None
        if self.byname:
            info = current.connection()
            name = info.export_name if info is not None and info.export_name else b""
        with self._lock:
            group = None
            for g in self._groups:
                if not self.byname or g.name == name:
                    group = g
                    break
            if group is None:
                group = _Group(name)
                self._groups.append(group)
            h = _Conn(next, mode, group)
            group.conns.append(h)
        return h

    def close(self, next: Context, h: Handle) -> None:
        with self._lock:
            group = h.group
            group.conns.remove(h)
            if not group.conns:
                self._groups.remove(group)
        next.close()

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        h.fua = next.can_fua()
        if h.mode is Mode.EMULATE:
            # Every FUA is a flush of all connections: emulated, whatever the plugin does.
            return FuaMode.EMULATE if h.fua is FuaMode.NATIVE else h.fua
        # Otherwise FUA goes to the plugin, which emulates it below us under nbdkit.
        return fua_above(h.fua)

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        if h.mode is Mode.PLUGIN:
            return next.can_multi_conn()
        return h.mode in (Mode.EMULATE, Mode.UNSAFE)

    def _mark(self, h: _Conn, is_write: bool) -> None:
        if self.track is Track.CONN:
            h.dirty |= WRITE if is_write else READ
        if self.track is not Track.OFF and is_write:
            h.group.dirty = True

    def _write(self, h: _Conn, flags: int, call: Callable[[int], None]) -> None:
        if flags & FLAG_FUA and h.mode is Mode.EMULATE:
            self._mark(h, True)
            call(flags & ~FLAG_FUA)
            self.flush(h.next, h, 0)
            return
        if not flags & FLAG_FUA:
            self._mark(h, True)
        with_fua(h.next, h.fua, flags, call)

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        self._mark(h, False)
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._write(h, flags, lambda f: next.pwrite(buf, offset, f))

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._write(h, flags, lambda f: next.zero(count, offset, f))

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._write(h, flags, lambda f: next.trim(count, offset, f))

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._mark(h, False)
        next.cache(count, offset, flags)

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        group = h.group
        track = self.track
        if h.mode is Mode.EMULATE:
            with self._lock:
                for other in group.conns:
                    if (track is Track.OFF or other.dirty & WRITE
                            or (group.dirty and (track is Track.FAST or other.dirty & READ))):
                        other.next.flush(flags)
                        other.dirty = 0
                group.dirty = False
            return
        if track is not Track.OFF and not group.dirty:
            return  # nothing written since the last flush
        next.flush(flags)
        if track is Track.CONN:
            if next.can_multi_conn():
                with self._lock:
                    for other in group.conns:
                        other.dirty = 0
                    group.dirty = False
            else:
                h.dirty = 0
        elif track is Track.FAST:
            group.dirty = False
