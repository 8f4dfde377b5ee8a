"""nbdkit-nocache-filter(1): what the client is told about NBD_CMD_CACHE
(``cachemode=none|emulate|nop``)."""

from __future__ import annotations

from collections.abc import Callable

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import CacheMode, Handle, StartupError

_MODES = {"none": CacheMode.NONE, "emulate": CacheMode.EMULATE,
          "nop": CacheMode.NATIVE, "no-op": CacheMode.NATIVE}


class Filter(Backend):
    name = "nocache"
    config_help = "cachemode=<MODE>     Either 'none' (default), 'emulate', or 'nop'."

    def __init__(self) -> None:
        self.mode = CacheMode.NONE

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key != "cachemode":
            next(key, value)
        elif value in _MODES:
            self.mode = _MODES[value]
        else:
            raise StartupError(f"unknown cachemode '{value}'")

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        # EMULATE: backend/context.py reads the range through the chain, as nbdkit does.
        return self.mode

    def cache(self, next: Context, h: Handle, count: int, offset: int, flags: int) -> None:
        """Only in mode nop: accepted and ignored."""
