"""Large reads sent from Lua's own memory, without lupa's copy into a Python ``bytes``.

lupa turns every Lua string it returns into a new ``bytes``: for a 256 KiB read that is a
256 KiB copy into freshly allocated (page-faulting) memory, on the thread that also runs
the Lua code, which is the bottleneck of large sequential reads.  Instead, nbdkit.lua keeps
the string a large pread returned alive in a table ("pins" it) and tells us its address
(``string.format("%p", s)``); we wrap the bytes in a read-only memoryview and the reply
goes to the socket straight from there.  When the memoryview is released (the reply was
sent), its slot is queued and given back to Lua (``unpin``) at the next large read, under
the request lock like every Lua call.

This reads a Lua 5.4 ``TString`` by address, so it is used only after a start-up probe
has checked the layout on this very build (the bytes and length of a known string at the
expected offsets); anywhere else (other Lua versions, LuaJIT, a layout that differs)
large reads take the ordinary path.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
from typing import Any

from luanbd.protocol.constants import LARGE_DATA

#: Reads of at least this many bytes are pinned; below it lupa's copy is cheaper than
#: the extra bookkeeping (and the compiled request loop serves them).
PIN_MIN = LARGE_DATA
#: Where a Lua 5.4 long string keeps its length and bytes, from the address %p gives:
#: CommonHeader (next, tt, marked), extra, shrlen, hash, then u.lnglen and contents.
LNGLEN_OFFSET = 16
CONTENTS_OFFSET = 24
#: The size of the probe string (a long string: more than 40 bytes).
PROBE_SIZE = PIN_MIN + 123


@functools.lru_cache(maxsize=64)
def _pinned_type(size: int) -> Any:
    """A ctypes array type of ``size`` bytes that gives its slot back when it dies."""

    class Pinned(ctypes.c_char * size):  # type: ignore[misc]
        slot: int
        released: collections.deque[int]
        owner: Pinning

        def __del__(self) -> None:
            # Any thread (the writer's, usually): only queue it; Lua is touched under
            # the request lock at the next large read.
            self.released.append(self.slot)

    return Pinned


class Pinning:
    """The pinned-read protocol with one Lua state (its nbdkit.lua ``control`` table)."""

    def __init__(self, control: Any) -> None:
        self.pread_pinned = control.pread_pinned
        self.pwrite_pinned = control.pwrite_pinned
        self._payload = control.payload
        self._unpin = control.unpin
        #: WRITE payloads can be received into Lua strings (control.blank is set).
        self.payloads = control.blank is not None
        self.released: collections.deque[int] = collections.deque()
        #: The size of each string pinned now, and their total.
        self._sizes: dict[int, int] = {}
        self.pinned_bytes = 0

    def view(self, slot: int, where: bytes, size: int) -> memoryview:
        """The pinned string ``slot`` at address ``where`` (``%p`` text) as bytes."""
        return self._array(slot, where, size).toreadonly()

    def _array(self, slot: int, where: bytes, size: int) -> memoryview:
        array = _pinned_type(size).from_address(int(where, 16) + CONTENTS_OFFSET)
        array.slot = slot
        array.released = self.released
        array.owner = self
        self._sizes[slot] = size
        self.pinned_bytes += size
        return memoryview(array).cast("B")

    def payload(self, size: int) -> tuple[memoryview, memoryview]:
        """A new pinned Lua string of ``size`` bytes for a WRITE payload: (the payload, as
        the request's read-only data; a writable view to receive it into).  Only its
        receiver writes into it, before the script ever sees the string (pwrite_slot), and
        a long string's hash is computed lazily, so Lua finds nothing changed."""
        if self.released:
            self.unpin_released()
        slot, where = self._payload(size)
        view = self._array(slot, where, size)
        return view.toreadonly(), view

    def pwrite_slot(self, data: object) -> int | None:
        """The slot of ``data`` if it is a payload of this state's (payload), else None."""
        if type(data) is not memoryview:
            return None
        array: Any = data.obj
        if getattr(array, "owner", None) is self and len(data) == len(array):
            return int(array.slot)
        return None

    def unpin_released(self) -> None:
        """Give Lua back the strings whose replies are gone (call under the request lock)."""
        released = self.released
        slots = []
        while released:
            slot = released.popleft()
            slots.append(slot)
            self.pinned_bytes -= self._sizes.pop(slot, 0)
        if slots:
            self._unpin(*slots)

    @classmethod
    def probe(cls, control: Any, lua_version: str) -> Pinning | None:
        """A Pinning if this Lua build lays out strings as expected, else None."""
        if lua_version != "Lua 5.4" or ctypes.sizeof(ctypes.c_size_t) != 8:
            return None
        sample = os.urandom(PROBE_SIZE)
        try:
            slot, where = control.pin_probe(sample)
            address = int(where, 16)
        except (TypeError, ValueError):
            return None
        try:
            length = ctypes.c_size_t.from_address(address + LNGLEN_OFFSET).value
            if length != PROBE_SIZE:
                return None
            if ctypes.string_at(address + CONTENTS_OFFSET, PROBE_SIZE) != sample:
                return None
        finally:
            control.unpin(slot)
        return cls(control)
