"""nbdkit-delay-filter(1): sleep before requests (``rdelay=``/``delay-read=``,
``wdelay=``, ``delay-write=``, ``delay-zero=``, ``delay-trim=``, ``delay-extents=``,
``delay-cache=``, ``delay-open=``, ``delay-close=``: whole seconds or ``NNms``;
``delay-fast-zero=BOOL``)."""

from __future__ import annotations

import re
from collections.abc import Callable

from luanbd import log
from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import (
    FLAG_FAST_ZERO,
    FastZeroRefused,
    Handle,
    PluginError,
    StartupError,
)
from luanbd.filters.params import bool_parameter, parse_number

_UINT_MAX = (1 << 32) - 1
_ULONG_MAX = (1 << 64) - 1

#: Each key, and its other spellings, -> the delay it sets.
_KEYS = {"rdelay": "read", "delay-read": "read", "delay-reads": "read",
         "delay-write": "write", "delay-writes": "write",
         "delay-zero": "zero", "delay-zeroes": "zero",
         "delay-trim": "trim", "delay-trims": "trim", "delay-discard": "trim",
         "delay-discards": "trim",
         "delay-extent": "extents", "delay-extents": "extents",
         "delay-cache": "cache", "delay-open": "open", "delay-close": "close"}

_SCANF_U = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")


def parse_delay_ms(key: str, value: str) -> int:
    """The filter's own syntax: ``NN`` seconds or ``NNms`` milliseconds -> milliseconds."""
    if len(value) > 2 and value.endswith("ms"):
        # nbdkit reads this with sscanf("%u"): digits after blanks and a sign, the rest is
        # ignored, and the number is wrapped to 32 bits as C's conversion does.
        m = _SCANF_U.match(value)
        if m is None:
            raise StartupError(f"cannot parse {key} in milliseconds parameter: {value}")
        n = min(int(m.group(2)), _ULONG_MAX)
        return (-n if m.group(1) == "-" else n) & _UINT_MAX
    seconds = parse_number(key, value)
    if seconds * 1000 > _UINT_MAX:
        raise StartupError(f"seconds parameter {key} is too large: {value}")
    return seconds * 1000


def _sleep(ms: int, call: str) -> None:
    """nbdkit_nanosleep: a server that begins to stop ends the sleep, and the request fails
    (ESHUTDOWN) with nbdkit's line."""
    if ms > 0:
        current.nanosleep(ms / 1000, call)


class Filter(Backend):
    name = "delay"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = (
        "rdelay=<NN>[ms]                Read delay in seconds/milliseconds.\n"
        "delay-read=<NN>[ms]            Read delay in seconds/milliseconds.\n"
        "delay-write=<NN>[ms]           Write delay in seconds/milliseconds.\n"
        "delay-zero=<NN>[ms]            Zero delay in seconds/milliseconds.\n"
        "delay-trim=<NN>[ms]            Trim delay in seconds/milliseconds.\n"
        "delay-extents=<NN>[ms]         Extents delay in seconds/milliseconds.\n"
        "delay-cache=<NN>[ms]           Cache delay in seconds/milliseconds.\n"
        "wdelay=<NN>[ms]                Write, zero and trim delay in secs/msecs.\n"
        "delay-fast-zero=<BOOL>         Delay fast zero requests (default true).\n"
        "delay-open=<NN>[ms]            Open delay in seconds/milliseconds.\n"
        "delay-close=<NN>[ms]           Close delay in seconds/milliseconds.")

    def __init__(self) -> None:
        #: Milliseconds, by request kind.
        self.ms = dict.fromkeys(("read", "write", "zero", "trim", "extents", "cache",
                                 "open", "close"), 0)
        self.fast_zero = True

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key in _KEYS:
            self.ms[_KEYS[key]] = parse_delay_ms(key, value)
        elif key == "wdelay":
            # Historically wdelay sets every write-related delay.
            self.ms["write"] = self.ms["zero"] = self.ms["trim"] = parse_delay_ms(key, value)
        elif key == "delay-fast-zero":
            self.fast_zero = bool_parameter(value)
        else:
            next(key, value)

    def can_fast_zero(self, next: Context, h: Handle) -> bool:
        if self.ms["zero"] and not self.fast_zero:
            return True  # refused at once, by us
        return next.can_fast_zero()

    def open(self, next: Context, readonly: bool) -> Handle:
        _sleep(self.ms["open"], "open")
        next.open(readonly)
        return None

    def close(self, next: Context, h: Handle) -> None:
        try:
            _sleep(self.ms["close"], "close")
        except PluginError as err:
            log.error(str(err))
        next.close()

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        _sleep(self.ms["read"], "pread")
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        _sleep(self.ms["write"], "pwrite")
        next.pwrite(buf, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        if flags & FLAG_FAST_ZERO and self.ms["zero"] and not self.fast_zero:
            raise FastZeroRefused
        _sleep(self.ms["zero"], "zero")
        next.zero(count, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        _sleep(self.ms["trim"], "trim")
        next.trim(count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        _sleep(self.ms["extents"], "extents")
        return next.extents(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        _sleep(self.ms["cache"], "cache")
        next.cache(count, offset, flags)
