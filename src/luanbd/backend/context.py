"""One opened export of one connection: capabilities asked once, emulation, locking.

It sits on top of the backend chain (``backend/chain.py``): this is nbdkit's ``backend.c`` +
the emulation half of ``plugins.c``: zero emulated by
pwrite, FUA by flush, cache by pread, and fast zero refused when it would be emulated.
Requests reaching this layer were validated by ``protocol.transmission.validate_request``;
the preconditions are asserted again here, not re-checked.
"""

from __future__ import annotations

import errno
from contextlib import AbstractContextManager
from dataclasses import dataclass

from luanbd.backend.chain import Context
from luanbd.backend.interface import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    CacheMode,
    FastZeroRefused,
    FuaMode,
    PluginError,
    ThreadModel,
    ZeroMode,
)
from luanbd.protocol.constants import MAX_REQUEST_SIZE, TransmissionFlag

#: Zero emulation writes at most this much per pwrite: big enough to be quick, small enough
#: not to make the plugin (a Lua string) allocate 64 MiB for one WRITE_ZEROES.
ZERO_EMULATION_CHUNK = 1024 * 1024
_ZEROES = bytes(ZERO_EMULATION_CHUNK)
#: Largest length of one block status descriptor that keeps 4 KiB alignment in 32 bits.
MAX_DESCRIPTOR = 0xFFFFF000
#: Most descriptors in one reply (nbdkit's MAX_EXTENTS): 8 MiB of classic descriptors, far
#: below the 64 MiB a libnbd client takes in one chunk; the reply then covers less.
MAX_EXTENTS = 1 << 20


class BlockSizeFailed(PluginError):
    """block_size failed while the export was opened: nbdkit drops the connection there
    (it is asked while the NBD_INFO_BLOCK_SIZE reply is built) instead of refusing the
    option."""


def _block_size(p: Context) -> tuple[int, int, int] | None:
    try:
        return p.block_size()
    except PluginError as err:
        raise BlockSizeFailed(err.callback, str(err), err.errno, bare=True) from None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Every capability of one handle, asked once at open (nbdkit protocol_common_open)."""

    size: int
    can_write: bool
    can_flush: bool
    is_rotational: bool
    can_trim: bool
    can_zero: ZeroMode
    can_fast_zero: bool
    can_extents: bool
    can_fua: FuaMode
    can_multi_conn: bool
    can_cache: CacheMode
    block_size: tuple[int, int, int] | None
    description: bytes | None

    @property
    def flags(self) -> TransmissionFlag:
        """Transmission flags (without SEND_DF, which depends on structured replies)."""
        f = TransmissionFlag.HAS_FLAGS
        if not self.can_write:
            f |= TransmissionFlag.READ_ONLY
        else:
            # Zeroing can be emulated with pwrite, so it is advertised unless a filter
            # says NONE.
            if self.can_zero is not ZeroMode.NONE:
                f |= TransmissionFlag.SEND_WRITE_ZEROES
            if self.can_trim:
                f |= TransmissionFlag.SEND_TRIM
            if self.can_fua is not FuaMode.NONE:
                f |= TransmissionFlag.SEND_FUA
            if self.can_fast_zero:
                f |= TransmissionFlag.SEND_FAST_ZERO
        if self.can_flush:
            f |= TransmissionFlag.SEND_FLUSH
        if self.is_rotational:
            f |= TransmissionFlag.ROTATIONAL
        if self.can_multi_conn:
            f |= TransmissionFlag.CAN_MULTI_CONN
        if self.can_cache is not CacheMode.NONE:
            f |= TransmissionFlag.SEND_CACHE
        return f


class BackendContext:
    """A connection's opened chain and its cached capabilities; every call down the chain
    holds ``lock``."""

    def __init__(self, top: Context, lock: AbstractContextManager[object], *,
                 readonly: bool, thread_model: ThreadModel) -> None:
        #: The first layer's context: every call goes down the chain from here.
        self.top = top
        self.lock = lock
        self.readonly = readonly
        self.thread_model = thread_model
        self.caps: Capabilities | None = None
        #: Copies of caps.size and caps.can_write for the hot path's asserts.
        self.size = -1
        self.can_write = False
        self._open = False
        #: Filters sit above the plugin: an emulated zero goes through them as a zero
        #: (nbdkit emulates it in the plugin layer, below the filters).
        self._filtered = top.next is not None

    def open(self) -> Capabilities:
        """Open the plugin handle and ask every capability once.  Raises PluginError."""
        p = self.top
        with self.lock:
            p.open(self.readonly)
            self._open = True
            try:
                size = p.get_size()
                # With -r the plugin's can_write is not consulted (as nbdkit).
                can_write = False if self.readonly else p.can_write()
                can_zero = p.can_zero() if can_write else ZeroMode.NONE
                self.caps = Capabilities(
                    size=size,
                    can_write=can_write,
                    can_flush=p.can_flush(),
                    is_rotational=p.is_rotational(),
                    can_trim=can_write and p.can_trim(),
                    can_zero=can_zero,
                    can_fast_zero=can_write and p.can_fast_zero(),
                    can_extents=p.can_extents(),
                    can_fua=p.can_fua() if can_write else FuaMode.NONE,
                    # nbdkit hides multi-conn when connections cannot overlap anyway.
                    can_multi_conn=(self.thread_model > ThreadModel.SERIALIZE_CONNECTIONS
                                    and p.can_multi_conn()),
                    can_cache=p.can_cache(),
                    block_size=_block_size(p),
                    description=p.export_description(),
                )
            except BaseException:
                self._close_locked()
                raise
        self.size = self.caps.size
        self.can_write = self.caps.can_write
        return self.caps

    def close(self) -> None:
        """Close the handle (errors are the plugin's to log; they cannot reach a client)."""
        if self._open:
            with self.lock:
                self._close_locked()

    def _close_locked(self) -> None:
        self._open = False
        self.top.close()

    @property
    def _caps(self) -> Capabilities:
        assert self.caps is not None, "export not open"
        return self.caps

    def _assert_range(self, count: int, offset: int) -> None:
        assert count > 0 and offset + count <= self.size, (count, offset)

    # --- data calls ---------------------------------------------------------------------
    def pread(self, count: int, offset: int) -> bytes | memoryview:
        assert 0 < count <= MAX_REQUEST_SIZE and offset + count <= self.size, (count, offset)
        with self.lock:
            return self.top.pread(count, offset, 0)

    def pwrite(self, buf: bytes, offset: int, fua: bool) -> None:
        assert len(buf) > 0 and offset + len(buf) <= self.size and self.can_write
        if not fua:
            with self.lock:
                self.top.pwrite(buf, offset, 0)
            return
        native = self._fua_native(fua)
        with self.lock:
            self.top.pwrite(buf, offset, FLAG_FUA if native else 0)
            if not native:
                self.top.flush(0)

    def flush(self) -> None:
        with self.lock:
            self.top.flush(0)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        self._assert_range(count, offset)
        assert self._caps.can_trim
        native = self._fua_native(fua)
        with self.lock:
            self.top.trim(count, offset, FLAG_FUA if native else 0)
            if fua and not native:
                self.top.flush(0)

    def zero(self, count: int, offset: int, *, may_trim: bool, fua: bool, fast: bool) -> None:
        """WRITE_ZEROES: the plugin's zero, else pwrite of zeroes (never for a fast zero)."""
        self._assert_range(count, offset)
        caps = self._caps
        assert caps.can_write
        native = self._fua_native(fua)
        with self.lock:
            if caps.can_zero is ZeroMode.NATIVE or self._filtered:
                flags = ((FLAG_MAY_TRIM if may_trim else 0) | (FLAG_FUA if native else 0)
                         | (FLAG_FAST_ZERO if fast else 0))
                try:
                    self.top.zero(count, offset, flags)
                except PluginError as err:
                    # ENOTSUP/EOPNOTSUPP from zero means "emulate me", unless the client
                    # asked for a fast zero, which emulation never is.
                    if fast or err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                else:
                    if fua and not native:
                        self.top.flush(0)
                    return
            elif fast:
                raise FastZeroRefused
            # A plugin without zero and no filter, or a filter's zero that answered ENOTSUP
            # (a plugin's ENOTSUP is emulated in the plugin layer, backend/chain.py).
            while count:
                chunk = min(count, ZERO_EMULATION_CHUNK)
                buf = _ZEROES if chunk == ZERO_EMULATION_CHUNK else _ZEROES[:chunk]
                self.top.pwrite(buf, offset, 0)
                offset += chunk
                count -= chunk
            if fua:
                self.top.flush(0)

    def cache(self, count: int, offset: int) -> None:
        self._assert_range(count, offset)
        mode = self._caps.can_cache
        assert mode is not CacheMode.NONE
        with self.lock:
            if mode is CacheMode.NATIVE:
                self.top.cache(count, offset, 0)
                return
            while count:  # EMULATE: read and throw away, as nbdkit does
                chunk = min(count, MAX_REQUEST_SIZE)
                self.top.pread(chunk, offset, 0)
                offset += chunk
                count -= chunk

    def extents(self, count: int, offset: int, req_one: bool,
                wide: bool = False) -> list[tuple[int, int]]:
        """base:allocation descriptors (length, flags) covering [offset, offset+count).

        ``wide``: the descriptors are 64-bit (extended headers), so none is capped at 32 bits.
        """
        self._assert_range(count, offset)
        if not self._caps.can_extents:
            return [(count, 0)]  # without extents the whole range is allocated data
        with self.lock:
            raw = self.top.extents(count, offset, FLAG_REQ_ONE if req_one else 0)
        return clip_extents(raw, count, offset, req_one, self._caps.size,
                            max_descriptor=(1 << 64) - 1 if wide else MAX_DESCRIPTOR)

    def meta_extents(self, context: bytes, count: int, offset: int, req_one: bool,
                     wide: bool = False) -> list[tuple[int, int]]:
        """Descriptors of another metadata context (backend/meta.py), validated as
        base:allocation's are, except that every 32-bit flag value is the context's own."""
        self._assert_range(count, offset)
        with self.lock:
            raw = self.top.meta_extents(context, count, offset, FLAG_REQ_ONE if req_one else 0)
        return clip_extents(raw, count, offset, req_one, self._caps.size,
                            max_descriptor=(1 << 64) - 1 if wide else MAX_DESCRIPTOR,
                            flag_mask=None, callback="meta_extents")

    def _fua_native(self, fua: bool) -> bool:
        """Pass FUA down rather than flush after?  With filters, always: they see the
        client's flag, and the plugin layer emulates it (nbdkit plugins.c)."""
        return fua and (self._filtered or self._caps.can_fua is FuaMode.NATIVE)


def clip_extents(raw: list[tuple[int, int, int]], count: int, offset: int, req_one: bool,
                 size: int, *, max_descriptor: int = 0xFFFFF000,
                 flag_mask: int | None = EXTENT_HOLE | EXTENT_ZERO,
                 callback: str = "extents") -> list[tuple[int, int]]:
    """Validate, merge and trim plugin extents as nbdkit's ``extents.c`` and ``protocol.c``.

    Extents must be ascending and contiguous; those wholly before ``offset`` are ignored and
    the first kept one must cover ``offset``.  Adjacent extents of one type merge (as
    nbdkit_add_extent does, also past offset+count), so the last descriptor may reach past
    the request, up to the end of the export; with REQ_ONE: one extent, at most ``count``.
    base:allocation keeps only the HOLE and ZERO bits (as nbdkit); with ``flag_mask`` None
    (another context) the flags must fit in 32 bits.
    """
    end = offset + count
    out: list[tuple[int, int]] = []
    pos = offset  # the end of what out covers, never past the export
    nxt = offset  # where the plugin's next extent must begin (its last one's real end)
    for e_offset, e_length, e_type in raw:
        if e_length <= 0:
            continue
        if out and e_offset >= size:
            break  # past the export's end: ignored, as nbdkit_add_extent does
        e_end = min(e_offset + e_length, size)
        if e_end <= pos and not out:
            continue  # before the range
        if e_offset > (nxt if out else pos):
            what = "first extent" if not out else "extents"
            raise PluginError(callback, f"{what} must be contiguous and cover the offset "
                                         f"(expected {nxt if out else pos}, got {e_offset})")
        if e_offset < nxt and out:
            raise PluginError(callback, "extents must be added in ascending order")
        nxt = e_offset + e_length
        if flag_mask is not None:
            kind = e_type & flag_mask
        elif 0 <= e_type <= 0xFFFFFFFF:
            kind = e_type
        else:
            raise PluginError(callback, f"extent flags {e_type} do not fit in 32 bits")
        length = e_end - pos
        if out and out[-1][1] == kind:
            out[-1] = (out[-1][0] + length, kind)
        elif pos >= end or len(out) == MAX_EXTENTS:
            break  # past the request, only same-type extents still merge into the last
        else:
            out.append((length, kind))
        pos = e_end
    if not out:
        raise PluginError(callback, "the plugin returned no extent covering the offset")
    if req_one:
        return [(min(out[0][0], count), out[0][1])]
    # A descriptor length is 32 bits on the wire (64 with extended headers): stop at the
    # first one that does not fit.
    for i, (length, kind) in enumerate(out):
        if length > max_descriptor:
            return [*out[:i], (max_descriptor, kind)]
    return out
