"""nbdkit-nofilter-filter(1): every request passes through unchanged."""

from __future__ import annotations

from luanbd.backend.chain import Backend


class Filter(Backend):
    name = "nofilter"
