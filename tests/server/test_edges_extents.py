"""clip_extents (backend/context.py) at the edges: what a hostile or careless plugin's
extents become on the wire.  The same cases run end to end over sockets in
tests/integration/test_edges_block_status.py; here each is one call, with exact results."""

from __future__ import annotations

import pytest

from luanbd.backend.context import MAX_DESCRIPTOR, MAX_EXTENTS, clip_extents
from luanbd.backend.interface import PluginError

G = 1 << 32
SIZE = 2 * G + 1
HZ = 3
W = (1 << 64) - 1


def clip(raw: list[tuple[int, int, int]], count: int, offset: int, *, req_one: bool = False,
         size: int = SIZE, wide: bool = False) -> list[tuple[int, int]]:
    return clip_extents(raw, count, offset, req_one, size,
                        max_descriptor=W if wide else MAX_DESCRIPTOR)


def test_past_the_end_is_ignored() -> None:
    # Regression: the first extent reaches past the disk, the next begins past it; the
    # second used to be "not contiguous" because the first was cut at the disk's end.
    raw = [(SIZE - 1, G, 0), (SIZE - 1 + G, G + 1, HZ), (SIZE + 2 * G, 5, 0)]
    assert clip(raw, 1, SIZE - 1) == [(1, 0)]
    assert clip(raw, 1, SIZE - 1, req_one=True) == [(1, 0)]
    assert clip([(0, SIZE + 511, HZ), (SIZE + 511, 2 * SIZE, 0)], 1, SIZE - 1) == [(1, HZ)]
    # Extents past the end that overlap or leave a gap are ignored too (nbdkit).
    assert clip([(SIZE - 1, 8192, 0), (SIZE + 4095, 8192, HZ)], 1, SIZE - 1) == [(1, 0)]
    # ... but within the disk they are the plugin's error.
    with pytest.raises(PluginError, match="ascending"):
        clip([(0, 8192, 0), (4096, 8192, HZ)], G, 0)
    with pytest.raises(PluginError, match="contiguous"):
        clip([(0, 4096, 0), (8192, 4096, HZ)], G, 0)
    # A gap right after an extent that was cut at the disk's end: past the end, ignored.
    assert clip([(SIZE - 1, 10, 0), (SIZE + 100, 10, HZ)], 1, SIZE - 1) == [(1, 0)]


@pytest.mark.parametrize("raw", [[], [(0, 0, 0)], [(0, -4096, 0)], [(SIZE, 4096, 0)],
                                 [(1, 4096, 0)], [(-(1 << 63), (1 << 63) - 1, 0)]])
def test_nothing_covers_the_offset(raw: list[tuple[int, int, int]]) -> None:
    with pytest.raises(PluginError, match="extent"):
        clip(raw, 4096, 0)


def test_lengths_of_2_32_and_more() -> None:
    raw = [(0, G, 0), (G, G + 1, HZ), (2 * G + 1, 3 * G, 0)]
    assert clip(raw, 0xFFFFFFFF, 0) == [(MAX_DESCRIPTOR, 0)]
    assert clip(raw, 0xFFFFFFFF, G - 1) == [(1, 0), (MAX_DESCRIPTOR, HZ)]
    assert clip(raw, 0xFFFFFFFF, 0, req_one=True) == [(0xFFFFFFFF, 0)]
    assert clip(raw, SIZE, 0, wide=True) == [(G, 0), (G + 1, HZ)]
    assert clip(raw, SIZE, 0, req_one=True, wide=True) == [(G, 0)]
    assert clip([(0, (1 << 63) - 1, 0)], 1, SIZE - 1, wide=True) == [(1, 0)]
    # 2^64 and more (a Python int has no width): still cut at the disk's end.
    assert clip([(0, 1 << 70, HZ)], SIZE, 0, wide=True) == [(SIZE, HZ)]


def test_starts_before_the_request_and_odd_types() -> None:
    assert clip([(0, G + 512, HZ), (G + 512, G, 0)], 0xFFFFFFFF, G) == [(512, HZ),
                                                                          (MAX_DESCRIPTOR, 0)]
    # Only the hole and zero bits count; -1 is both.
    assert clip([(0, 4096, -1), (4096, 4096, 1 << 40), (8192, 4096, 4)], G, 0) == [
        (4096, HZ), (8192, 0)]


def test_huge_counts_are_capped() -> None:
    n = MAX_EXTENTS + 10
    raw = [(i, 1, (i % 2) * HZ) for i in range(n)] + [(n, SIZE - n, 0)]
    out = clip(raw, 0xFFFFFFFF, 0)
    assert len(out) == MAX_EXTENTS and sum(length for length, _ in out) == MAX_EXTENTS
    assert clip(raw, 0xFFFFFFFF, 0, req_one=True) == [(1, 0)]
    # Below the cap everything comes back, the last merged with the tail.
    assert len(clip([*raw[:1000], (1000, SIZE - 1000, HZ)], 0xFFFFFFFF, 0)) == 1000
