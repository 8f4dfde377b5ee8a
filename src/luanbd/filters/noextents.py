"""nbdkit-noextents-filter(1): no extents, so the whole disk reads as allocated data."""

from __future__ import annotations

from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import Handle


class Filter(Backend):
    name = "noextents"

    def can_extents(self, next: Context, h: Handle) -> bool:
        return False
