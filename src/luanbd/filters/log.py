"""nbdkit-log-filter(1): every transaction logged to ``logfile=FILE`` (truncated, or appended
to with ``logappend=true``) and/or passed to ``logscript=SCRIPT`` (sh, with the fields as
shell variables), in nbdkit 1.32's format: ``Ready``, ``Fork``, ``Preconnect``,
``ListExports``, ``Connect`` (the export and its capabilities), one ``Read``/``Write``/...
line when a request enters and one ``...Read`` when it leaves (``return=0``, or
``return=-1 error=ENAME``), ``Disconnect transactions=N``."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.context import clip_extents
from luanbd.backend.interface import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    FuaMode,
    Handle,
    StartupError,
)
from luanbd.filters.emulate import fua_above, with_fua, zero_or_emulate
from luanbd.filters.params import bool_parameter

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_=,:/")

#: errno -> the NBD error nbdkit's server sends, as the log names it.
_ERROR_NAMES = {
    errno.EROFS: "EPERM", errno.EPERM: "EPERM", errno.EIO: "EIO", errno.ENOMEM: "ENOMEM",
    errno.EDQUOT: "ENOSPC", errno.EFBIG: "ENOSPC", errno.ENOSPC: "ENOSPC",
    errno.ESHUTDOWN: "ESHUTDOWN", errno.ENOTSUP: "ENOTSUP", errno.EOPNOTSUPP: "ENOTSUP",
    errno.EOVERFLOW: "EOVERFLOW",
}


def shell_quote(text: str) -> str:
    """nbdkit's shell_quote: as is when only safe characters, else double-quoted."""
    if text and all(c in _SAFE for c in text):
        return text
    escaped = "".join("\\" + c if c in '$`\\"' else c for c in text)
    return f'"{escaped}"'


def _name(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace")


class _Conn:
    """A connection's number and its last transaction id."""

    __slots__ = ("connection", "fua", "id")

    def __init__(self, connection: int) -> None:
        self.connection = connection
        self.id = 0
        self.fua = FuaMode.NATIVE


class Filter(Backend):
    name = "log"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = ("logfile=<FILE>               The file to place the log in.\n"
                   "logappend=<BOOL>             True to append to the log (default false).\n"
                   "logscript=<SCRIPT>           Script to run for logging.")

    def __init__(self) -> None:
        self.logfilename: str | None = None
        self.logscript: str | None = None
        self.append = False
        self.file: IO[str] | None = None
        self.lock = threading.Lock()
        self.connections = 0
        self.preconnect_id = 0
        self.list_id = 0
        self.pid = os.getpid()

    # --- output ---------------------------------------------------------------------------
    def _emit(self, h: _Conn | None, id: int, act: str, kind: str, text: str) -> None:
        if self.file is not None:
            now = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
            stamp += f".{int(now % 1 * 1e6):06d}"
            line = stamp + (f" connection={h.connection}" if h else "")
            line += " " + ("..." if kind == "LEAVE" else "") + act
            if id:
                line += f" id={id}"
            if text:
                line += " " + text
            if kind == "ENTER":
                line += " ..."
            with self.lock:
                self.file.write(line + "\n")
                self.file.flush()
        if self.logscript is not None:
            script = f"act={act}\n"
            if h:
                script += f"connection={h.connection}\n"
            script += f"type={kind}\n"
            if id:
                script += f"id={id}\n"
            script += text + "\n" + self.logscript
            # Run as system(3) does; its status is ignored (nbdkit 1.32 logs nothing).
            subprocess.run(["/bin/sh", "-c", script], check=False)

    def _leave(self, h: _Conn | None, id: int, act: str, err: BaseException | None) -> None:
        if err is None:
            self._emit(h, id, act, "LEAVE", "return=0")
        else:
            code = getattr(err, "errno", None) or errno.EIO
            self._emit(h, id, act, "LEAVE",
                       f"return=-1 error={_ERROR_NAMES.get(code, 'EINVAL')}")

    def _call(self, h: _Conn, act: str, text: str, fn: Callable[[], Any]) -> Any:
        with self.lock:
            h.id += 1
            id = h.id
        self._emit(h, id, act, "ENTER", text)
        try:
            r = fn()
        except Exception as e:
            self._leave(h, id, act, e)
            raise
        self._leave(h, id, act, None)
        return r

    # --- process-wide ---------------------------------------------------------------------
    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "logfile":
            self.logfilename = value
        elif key == "logappend":
            self.append = bool_parameter(value)
        elif key == "logscript":
            self.logscript = value
        else:
            next(key, value)

    def get_ready(self) -> None:
        if self.logfilename is not None:
            try:
                self.file = open(self.logfilename, "a" if self.append else "w",  # noqa: SIM115
                                 encoding="utf-8", errors="replace")
            except OSError as e:
                raise StartupError(f"open: {self.logfilename}: {e.strerror}") from None
        self.pid = os.getpid()
        self._emit(None, 0, "Ready", "PRINT", f"thread_model={int(self.chain_thread_model)}")

    def after_fork(self) -> None:
        if os.getpid() != self.pid:
            self._emit(None, 0, "Fork", "PRINT", "")

    def unload(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    # --- handshake ------------------------------------------------------------------------
    def preconnect(self, next: Context, readonly: bool) -> None:
        with self.lock:
            self.preconnect_id += 1
            id = self.preconnect_id
        self._emit(None, id, "Preconnect", "ENTER", f"readonly={int(readonly)}")
        try:
            next.preconnect(readonly)
        except Exception as e:
            self._leave(None, id, "Preconnect", e)
            raise
        self._leave(None, id, "Preconnect", None)

    def list_exports(self, next: Context, readonly: bool,
                     is_tls: bool) -> list[tuple[bytes, bytes | None]]:
        with self.lock:
            self.list_id += 1
            id = self.list_id
        self._emit(None, id, "ListExports", "ENTER", f"readonly={int(readonly)} tls={int(is_tls)}")
        try:
            exports = next.list_exports(readonly, is_tls)
        except Exception as e:
            self._leave(None, id, "ListExports", e)
            raise
        names = " ".join(shell_quote(_name(n)) for n, _ in exports)
        self._emit(None, id, "ListExports", "LEAVE", f"exports=({names}) return=0")
        return exports

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        with self.lock:
            self.connections += 1
            h = _Conn(self.connections)
        info = current.connection()
        export = _name(info.export_name if info else b"")
        tls = int(info.is_tls) if info else 0
        # nbdkit's .prepare: the capabilities of the layers below.
        # (A read-only connection cannot write, trim, zero or FUA, whatever the layers say.)
        size = next.get_size()
        w = not readonly and next.can_write()
        f = next.can_flush()
        r = next.is_rotational()
        t = w and next.can_trim()
        z = (2 if next.can_zero() else 1) if w else 0
        h.fua = next.can_fua() if w else FuaMode.NONE
        fua = int(h.fua)
        e = next.can_extents()
        c = int(next.can_cache())
        fz = w and next.can_fast_zero()
        minsize, prefsize, maxsize = next.block_size() or (0, 0, 0)
        self._emit(h, 0, "Connect", "PRINT",
                   f"export={shell_quote(export)} tls={tls} size={size:#x} "
                   f"minsize={minsize:#x} prefsize={prefsize:#x} maxsize={maxsize:#x} "
                   f"write={int(w)} flush={int(f)} rotational={int(r)} trim={int(t)} "
                   f"zero={z} fua={fua} extents={int(e)} cache={c} fast_zero={int(fz)}")
        return h

    def can_fua(self, next: Context, h: Handle) -> FuaMode:
        # nbdkit emulates FUA in the plugin layer, below this one, so the log shows the
        # flag: here too, by flushing after the call ourselves (unlogged).
        return fua_above(h.fua)

    @staticmethod
    def _fua(next: Context, h: _Conn, flags: int, call: Callable[[int], None]) -> None:
        with_fua(next, h.fua, flags, call)

    def close(self, next: Context, h: Handle) -> None:
        self._emit(h, 0, "Disconnect", "PRINT", f"transactions={h.id}")
        next.close()

    # --- data -----------------------------------------------------------------------------
    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        result: bytes | memoryview = self._call(
            h, "Read", f"offset={offset:#x} count={count:#x}",
            lambda: next.pread(count, offset, flags))
        return result

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._call(h, "Write", f"offset={offset:#x} count={len(buf):#x} "
                               f"fua={int(bool(flags & FLAG_FUA))}",
                   lambda: self._fua(next, h, flags, lambda f: next.pwrite(buf, offset, f)))

    def flush(self, next: Context, h: Handle, flags: int) -> None:
        self._call(h, "Flush", "", lambda: next.flush(flags))

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._call(h, "Trim", f"offset={offset:#x} count={count:#x} "
                              f"fua={int(bool(flags & FLAG_FUA))}",
                   lambda: self._fua(next, h, flags, lambda f: next.trim(count, offset, f)))

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._call(h, "Zero", f"offset={offset:#x} count={count:#x} "
                              f"trim={int(bool(flags & FLAG_MAY_TRIM))} "
                              f"fua={int(bool(flags & FLAG_FUA))} "
                              f"fast={int(bool(flags & FLAG_FAST_ZERO))}",
                   lambda: self._fua(next, h, flags,
                                     lambda f: zero_or_emulate(next, count, offset, f)))

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._call(h, "Cache", f"offset={offset:#x} count={count:#x}",
                   lambda: next.cache(count, offset, flags))

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        with self.lock:
            h.id += 1
            id = h.id
        self._emit(h, id, "Extents", "ENTER", f"offset={offset:#x} count={count:#x} "
                                              f"req_one={int(bool(flags & FLAG_REQ_ONE))}")
        try:
            raw = next.extents(count, offset, flags)
            # What nbdkit's extents list holds: merged, from offset, cut at the export's end.
            merged = clip_extents(raw, count, offset, False, next.get_size(),
                                  max_descriptor=(1 << 64) - 1)
        except Exception as e:
            self._leave(h, id, "Extents", e)
            raise
        parts, pos = [], offset
        for length, kind in merged:
            words = [w for bit, w in ((EXTENT_HOLE, "hole"), (EXTENT_ZERO, "zero"))
                     if kind & bit]
            parts.append(f'{pos:#x} {length:#x} "{",".join(words)}"')
            pos += length
        self._emit(h, id, "Extents", "LEAVE", f"extents=({' '.join(parts)}) return=0")
        return raw

