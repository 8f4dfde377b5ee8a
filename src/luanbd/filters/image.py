"""The capabilities of a filter that serves an image decoded from the plugin's data (gzip,
xz): read-only, the same for every connection, no extents, cache requests done by reading
(nbdkit's gzip and xz filters answer the same)."""

from __future__ import annotations

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import CacheMode, Handle


class DecodedImage(Backend):
    def can_write(self, next: Context, h: Handle) -> bool:
        return False

    def can_multi_conn(self, next: Context, h: Handle) -> bool:
        return True

    def can_extents(self, next: Context, h: Handle) -> bool:
        return False

    def can_cache(self, next: Context, h: Handle) -> CacheMode:
        return CacheMode.EMULATE
