"""nbdkit-error-filter(1): inject errors into requests (``error=``, ``error-rate=``,
``error-file=`` and their per-request forms ``error-pread=``, ``error-pread-rate=``,
``error-pread-file=``, ... for pwrite, trim, zero, extents and cache)."""

from __future__ import annotations

import errno
import math
import os
import random
import re
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.helpers import absolute_path
from luanbd.backend.interface import Handle, PluginError, StartupError

#: The errors the filter may inject (the NBD protocol has only a few).
ERRORS = {"EPERM": errno.EPERM, "EIO": errno.EIO, "ENOMEM": errno.ENOMEM,
          "EINVAL": errno.EINVAL, "ENOSPC": errno.ENOSPC, "ESHUTDOWN": errno.ESHUTDOWN}
_NAMES = {v: k for k, v in ERRORS.items()}
#: The requests it may fail, as its messages name them.
CALLS = ("pread", "pwrite", "trim", "zero", "extents", "cache")

# What C's sscanf("%lg") takes: decimal, hexadecimal, inf, nan.
_FLOAT = re.compile(
    r"\s*([+-]?(?:0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?\d+)?"
    r"|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?"
    r"|[nN][aA][nN](?:\([0-9A-Za-z_]*\))?))")


def _c_double(text: str) -> float:
    t = text.lower().lstrip("+-")
    sign = -1.0 if text.startswith("-") else 1.0
    if t.startswith("0x"):
        return sign * float.fromhex(t)
    if t.startswith("nan"):
        return math.nan
    return sign * float(t)


def parse_rate(key: str, value: str) -> float:
    """``N%`` or a probability 0..1, as nbdkit's error filter (a start-up error in its
    words)."""
    m = _FLOAT.match(value)
    rest = value[m.end():] if m else None
    if m is None or rest not in ("", "%"):
        raise StartupError(f"{key}: could not parse rate '{value}'")
    d = _c_double(m.group(1))
    if rest == "%":
        d /= 100.0
    if d < 0 or d > 1:
        raise StartupError(f"{key}: rate out of range: '{value}' parsed as {d:g}")
    return d


class _Settings:
    """What to inject into one kind of request."""

    __slots__ = ("error", "file", "rate")

    def __init__(self) -> None:
        self.error = errno.EIO
        self.rate = 0.0
        self.file: str | None = None


class Filter(Backend):
    name = "error"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = (
        "error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN\n"
        "                               The error indication to return.\n"
        "error-rate=0%..100%|0..1       Rate of errors to generate.\n"
        "error-file=TRIGGER             Set trigger filename.\n"
        "error-pread*, error-pwrite*, error-trim*, error-zero*, error-extents*\n"
        "                               Apply settings only to read/write/etc")

    def __init__(self) -> None:
        self.settings = {call: _Settings() for call in CALLS}

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        parts = key.split("-")
        if parts[0] != "error" or len(parts) > 3:
            next(key, value)
            return
        # error[-CALL][-rate|-file]
        calls = list(CALLS)
        if len(parts) >= 2 and parts[1] in CALLS:
            calls = [parts[1]]
            del parts[1]
        if len(parts) > 2:
            next(key, value)
            return
        what = parts[1] if len(parts) == 2 else ""
        if what == "":
            if value not in ERRORS:
                raise StartupError(f"{key}: unknown error name '{value}'")
            for c in calls:
                self.settings[c].error = ERRORS[value]
        elif what == "rate":
            rate = parse_rate(key, value)
            for c in calls:
                self.settings[c].rate = rate
        elif what == "file":
            # nbdkit_absolute_path: the trigger file need not exist yet.  An empty name is
            # an error nbdkit logs and goes on from, without a trigger file.
            path: str | None = None
            try:
                path = absolute_path(value)
            except ValueError as err:
                log.error(str(err))
            for c in calls:
                self.settings[c].file = path
        else:
            next(key, value)

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        return random.Random()

    def _inject(self, h: random.Random, call: str) -> None:
        s = self.settings[call]
        if s.rate <= 0:  # never
            return
        if s.file is not None and not os.path.exists(s.file):
            return
        # (Comparisons as nbdkit's: a rate of nan always injects.)
        if not s.rate >= 1 and h.random() >= s.rate:
            return
        raise PluginError(call, f"injecting {_NAMES[s.error]} error into {call}", s.error,
                          bare=True)

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        self._inject(h, "pread")
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._inject(h, "pwrite")
        next.pwrite(buf, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._inject(h, "trim")
        next.trim(count, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._inject(h, "zero")
        next.zero(count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        self._inject(h, "extents")
        return next.extents(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._inject(h, "cache")
        next.cache(count, offset, flags)
