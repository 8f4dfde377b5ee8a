"""nbdkit-blocksize-policy-filter(1): the block size constraints the client is told
(``blocksize-minimum=``, ``blocksize-preferred=``, ``blocksize-maximum=``), and with
``blocksize-error-policy=error`` requests that break them fail with EINVAL before the
plugin sees them.  (nbdkit 1.32 has no ``blocksize-write-disconnect``: that key goes on
to the plugin, as there.)"""

from __future__ import annotations

import errno
from collections.abc import Callable

from luanbd import log
from luanbd.backend.chain import Backend, Context
from luanbd.backend.helpers import parse_size
from luanbd.backend.interface import Handle, PluginError, StartupError

_UINT32_MAX = (1 << 32) - 1
_KEYS = ("blocksize-minimum", "blocksize-preferred", "blocksize-maximum")


def _size(key: str, value: str) -> int:
    try:
        n = parse_size(value)
    except ValueError as err:
        log.error(str(err))  # nbdkit_parse_size's own line comes first
        n = -1
    if n < 0 or n > _UINT32_MAX:
        raise StartupError(f"{key}: could not parse {value}")
    return n


def _power_of_2(n: int) -> bool:
    return n & (n - 1) == 0


class _Sizes:
    """A connection's constraints, asked once (nbdkit's backend caches block_size)."""

    __slots__ = ("sizes",)

    def __init__(self) -> None:
        self.sizes: tuple[int, int, int] | None = None


class Filter(Backend):
    name = "blocksize-policy"
    #: Offsets and data are the plugin's: its other metadata contexts stay true here.
    passes_meta_contexts = True
    config_help = ("blocksize-minimum=<N>       Minimum block size to advertise.\n"
                   "blocksize-preferred=<N>     Preferred block size to advertise.\n"
                   "blocksize-maximum=<N>       Maximum block size to advertise.\n"
                   "blocksize-error-policy=allow|error\n"
                   "                            Pass on (default) or refuse (EINVAL) requests "
                   "that break them.")

    def __init__(self) -> None:
        self.minimum = self.preferred = self.maximum = 0
        self.error_policy = False

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "blocksize-error-policy":
            if value not in ("allow", "error"):
                raise StartupError(f"unknown {key}: {value}")
            self.error_policy = value == "error"
        elif key in _KEYS:
            setattr(self, key.removeprefix("blocksize-"), _size(key, value))
        else:
            next(key, value)

    def config_complete(self, next: Callable[[], None]) -> None:
        mn, pref, mx = self.minimum, self.preferred, self.maximum
        if mn and not _power_of_2(mn):
            raise StartupError("blocksize-minimum must be a power of 2")
        if mn > 65536:
            raise StartupError("blocksize-minimum must be <= 64K")
        if pref and not _power_of_2(pref):
            raise StartupError("blocksize-preferred must be a power of 2")
        if pref and not 512 <= pref <= 32 * 1024 * 1024:
            raise StartupError("blocksize-preferred must be between 512 and 32M")
        if mn and pref and mn > pref:
            raise StartupError("blocksize-minimum must be <= blocksize-preferred")
        if pref and mx and pref > mx:
            raise StartupError("blocksize-preferred must be <= blocksize-maximum")
        next()

    def open(self, next: Context, readonly: bool) -> Handle:
        next.open(readonly)
        return _Sizes()

    def _compute(self, next: Context) -> tuple[int, int, int] | None:
        if self.minimum and self.preferred and self.maximum:
            return self.minimum, self.preferred, self.maximum
        theirs = next.block_size()
        if not (self.minimum or self.preferred or self.maximum):
            return theirs
        if theirs is None or theirs[0] == 0:  # the plugin set nothing
            mn = self.minimum or 1
            pref = self.preferred or 4096
            mx = self.maximum or _UINT32_MAX
        else:
            mn = self.minimum or theirs[0]
            pref = self.preferred or theirs[1]
            mx = self.maximum or theirs[2]
        if mn > pref or pref > mx:
            raise PluginError("block_size", f"computed block size values are invalid, "
                                            f"minimum {mn} > preferred {pref} or preferred > "
                                            f"maximum {mx}", errno.EINVAL, bare=True)
        return mn, pref, mx

    def block_size(self, next: Context, h: Handle) -> tuple[int, int, int] | None:
        if h.sizes is None:
            h.sizes = self._compute(next)
        sizes: tuple[int, int, int] | None = h.sizes
        return sizes

    def _check(self, next: Context, h: Handle, kind: str, count: int, offset: int) -> None:
        """nbdkit check_policy: the maximum binds only requests with data."""
        if not self.error_policy:
            return
        sizes = self.block_size(next, h)
        if sizes is None or sizes[0] == 0:
            return
        mn, _, mx = sizes
        why = None
        if count < mn:
            why = f"count {count} is smaller than minimum size {mn}"
        elif kind in ("pread", "pwrite") and count > mx:
            why = f"count {count} is larger than maximum size {mx}"
        elif count % mn:
            why = f"count {count} is not a multiple of minimum size {mn}"
        elif offset % mn:
            why = f"offset {offset} is not aligned to a multiple of minimum size {mn}"
        if why:
            raise PluginError(kind, f"client {kind} request rejected: {why}", errno.EINVAL,
                              bare=True)

    def pread(self, next: Context, h: Handle, count: int, offset: int,
              flags: int) -> bytes | memoryview:
        self._check(next, h, "pread", count, offset)
        return next.pread(count, offset, flags)

    def pwrite(self, next: Context, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._check(next, h, "pwrite", len(buf), offset)
        next.pwrite(buf, offset, flags)

    def zero(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check(next, h, "zero", count, offset)
        next.zero(count, offset, flags)

    def trim(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check(next, h, "trim", count, offset)
        next.trim(count, offset, flags)

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        self._check(next, h, "cache", count, offset)
        next.cache(count, offset, flags)

    def extents(self, next: Context, h: Handle, count: int, offset: int,
                flags: int) -> list[tuple[int, int, int]]:
        self._check(next, h, "extents", count, offset)
        return next.extents(count, offset, flags)
