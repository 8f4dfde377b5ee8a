"""The transmission phase, sans-IO: request parsing and validation (proto.md "Transmission").

:class:`RequestParser` turns client bytes into :class:`Request` objects.  ``validate_request``
checks a request against the negotiated :class:`Session` in nbdkit's order
(``server/protocol.c`` ``validate_request``), so a plugin never sees an out-of-range,
unadvertised or oversized request.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from luanbd.protocol.constants import (
    BASE_ALLOCATION,
    EXTENDED_REQUEST_HEADER,
    EXTENDED_REQUEST_MAGIC,
    LARGE_DATA,
    MAX_REQUEST_SIZE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    TransmissionFlag,
)
from luanbd.protocol.errors import ProtocolViolation, RequestError
from luanbd.protocol.handshake import NEED_DATA, Negotiated, _NeedData
from luanbd.protocol.meta_context import Selected


class Request(NamedTuple):
    """One client request.  ``cmd`` is a plain int when the command is unknown.

    A NamedTuple, not a frozen dataclass: it is built once per request and a frozen
    dataclass costs a microsecond more to construct.
    """

    cmd: Cmd | int
    flags: int
    #: Opaque value echoed in the reply (called "handle" before proto.md 3.x).
    cookie: int
    offset: int
    length: int
    #: The payload of NBD_CMD_WRITE; None for other commands and for oversize writes (or
    #: writes whose payload could not be allocated), whose payload was read and dropped so
    #: that the stream stays in step.
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class PlainRequests:
    """The one definition of a "plain" request: a READ, or a WRITE on a writable export,
    with no flags, in range, of 1 to ``max_length`` bytes.  No rule of validate_request
    applies to it, so a request loop may hand it to the plugin at once.  The compiled loop
    (server/_fastpath.c) gets these fields as data, with a smaller ``max_length``.
    """

    size: int
    writable: bool
    max_length: int = MAX_REQUEST_SIZE

    def admits(self, cmd: Cmd | int, flags: int, offset: int, length: int) -> bool:
        return (not flags and 0 < length <= self.max_length and offset + length <= self.size
                and (cmd is Cmd.READ or (cmd is Cmd.WRITE and self.writable)))


@dataclass(frozen=True, slots=True)
class Session:
    """What was negotiated and what validation depends on."""

    export_name: bytes
    size: int
    flags: TransmissionFlag
    structured_replies: bool
    base_allocation_id: int | None
    #: NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths, extended replies.
    extended_headers: bool = False
    #: Every selected metadata context, (id, name); BLOCK_STATUS answers each.
    meta_contexts: Selected = ()
    #: Which requests are plain on this export (derived from size and flags).
    plain: PlainRequests = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", PlainRequests(self.size, not self.read_only))
        if not self.meta_contexts and self.base_allocation_id is not None:
            object.__setattr__(self, "meta_contexts",
                               ((self.base_allocation_id, BASE_ALLOCATION),))

    @classmethod
    def from_negotiated(cls, negotiated: Negotiated) -> Session:
        return cls(negotiated.export_name, negotiated.size, negotiated.flags,
                   negotiated.structured_replies, negotiated.base_allocation_id,
                   negotiated.extended_headers, negotiated.meta_contexts)

    @property
    def read_only(self) -> bool:
        return bool(int(self.flags) & _READ_ONLY)


#: int -> Cmd without going through Enum.__call__ (hot path: once per request).
_CMDS: dict[int, Cmd] = {int(c): c for c in Cmd}
_KNOWN_FLAGS = int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE
                   | CmdFlag.FAST_ZERO)
# Plain ints: IntFlag arithmetic costs microseconds per request.
_FUA, _NO_HOLE, _DF, _REQ_ONE, _FAST_ZERO = (int(f) for f in (
    CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.FAST_ZERO))
_READ_ONLY, _SEND_FLUSH, _SEND_FUA, _SEND_TRIM, _SEND_WRITE_ZEROES, _SEND_CACHE, \
    _SEND_FAST_ZERO = (int(f) for f in (
        TransmissionFlag.READ_ONLY, TransmissionFlag.SEND_FLUSH, TransmissionFlag.SEND_FUA,
        TransmissionFlag.SEND_TRIM, TransmissionFlag.SEND_WRITE_ZEROES,
        TransmissionFlag.SEND_CACHE, TransmissionFlag.SEND_FAST_ZERO))
_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
_RANGED = (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_BLOCK_STAT_PAYLOAD = int(TransmissionFlag.BLOCK_STAT_PAYLOAD)


#: The biggest BLOCK_STATUS payload read: the effect length and 4096 context ids.
MAX_STATUS_PAYLOAD = 8 + 4 * 4096
_U64 = struct.Struct(">Q")

#: Request(...) without NamedTuple's Python-level __new__ (once per request).
_new_request = tuple.__new__

#: Makes a ``bytes`` object of n bytes and a writable view of its contents, filled before
#: anybody else sees the object (the I/O layer's trick, luanbd.server.transport).
PayloadBuffer = Callable[[int], tuple[bytes, memoryview]]


class RequestParser:
    """Incremental parser of the request stream.

    The I/O layer may receive straight into the parser's buffer (:meth:`get_buffer` then
    :meth:`commit`), so a WRITE payload is copied once, from that buffer into the ``bytes``
    handed to the plugin.  :meth:`receive_data` is the same for bytes held elsewhere.

    With ``extended=True`` (NBD_OPT_EXTENDED_HEADERS was negotiated) requests are 32-byte
    extended headers with 64-bit lengths, and any other header is a protocol violation.

    With a ``payload_buffer``, a WRITE payload of LARGE_DATA bytes or more that has not all
    arrived yet goes straight into its final ``bytes`` object instead of through the buffer.
    """

    def __init__(self, initial: bytes = b"", chunk: int = 256 * 1024,
                 extended: bool = False, payload_buffer: PayloadBuffer | None = None) -> None:
        self._extended = extended
        self._payload_buffer = payload_buffer
        # Extended headers (proto.md "Extended headers") only change the header's layout.
        self._header = EXTENDED_REQUEST_HEADER if extended else REQUEST_HEADER
        self._header_size = self._header.size
        self._magic = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        self._chunk = chunk
        self._buffer = bytearray(max(chunk, len(initial)))
        self._buffer[: len(initial)] = initial
        self._pos = 0
        self._end = len(initial)
        self._discard = 0
        #: Bytes the request being assembled still needs (so get_buffer can make room).
        self._need = 0
        #: A big WRITE whose payload is being received straight into ``_payload``.
        self._payload: bytes | None = None
        self._payload_view = memoryview(b"")
        self._payload_filled = 0
        self._payload_header: tuple[int, int, int, int] = (0, 0, 0, 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add client bytes."""
        view = memoryview(data)
        while view:
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            target.release()
            self.commit(n)
            view = view[n:]

    @property
    def receiving_payload(self) -> bool:
        """The view :meth:`get_buffer` gives is the rest of a big WRITE payload: nothing else
        can arrive before it is full (the socket layer may wait for all of it at once)."""
        payload = self._payload
        return payload is not None and self._payload_filled < len(payload)

    def get_buffer(self) -> memoryview:
        """Free space at the end of the buffer to receive into; release it before commit."""
        if self.receiving_payload:
            return self._payload_view[self._payload_filled:]
        buf = self._buffer
        want = max(self._chunk, self._need)
        if len(buf) - self._end < want:
            # Move the unparsed bytes to the front; grow only for a payload that needs it.
            live = self._end - self._pos
            if self._pos:
                buf[:live] = buf[self._pos:self._end]
                self._pos, self._end = 0, live
            if len(buf) - live < want:
                buf.extend(bytes(live + want - len(buf)))
            elif len(buf) > max(2 * self._chunk, live + want) and not self._need:
                del buf[live + want:]  # shrink back after a large payload
        return memoryview(buf)[self._end:]

    def commit(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`get_buffer` view."""
        if self.receiving_payload:
            self._payload_filled += n
            return
        if self._discard:
            taken = min(self._discard, n)
            self._discard -= taken
            if taken < n:  # move what follows the dropped payload down
                self._buffer[self._end:self._end + n - taken] = \
                    self._buffer[self._end + taken:self._end + n]
            n -= taken
        self._end += n

    def raw_state(self) -> tuple[bytearray, int, int] | None:
        """(buffer, pos, end) for an outside request loop (luanbd.server._fastpath) that
        parses classic headers itself, or None while a payload is in progress."""
        if self._extended or self._payload is not None or self._discard:
            return None
        return self._buffer, self._pos, self._end

    def set_raw_state(self, pos: int, end: int) -> None:
        """What the outside loop left: unparsed bytes in [pos, end) of the same buffer."""
        self._pos, self._end, self._need = pos, end, 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed."""
        return self._end - self._pos

    def next_request(self) -> Request | _NeedData:
        """The next complete request, or ``NEED_DATA``.  Raises ProtocolViolation."""
        if self._payload is not None:
            return self._direct_payload_request()
        buf = self._buffer
        pos = self._pos
        avail = self._end - pos
        size = self._header_size
        if self._discard or avail < size:
            self._need = 0
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = self._header.unpack_from(buf, pos)
        if magic != self._magic:
            kind = "extended request" if self._extended else "request"
            raise ProtocolViolation(f"invalid {kind}: 'magic' field is incorrect (0x{magic:x})")
        cmd = _CMDS.get(cmd, cmd)
        data = None
        start = pos + size
        if cmd is Cmd.WRITE and length <= MAX_REQUEST_SIZE:
            try:
                if avail - size < length:
                    if length >= LARGE_DATA and self._payload_buffer is not None:
                        return self._start_direct_payload(flags, cookie, offset, length, start)
                    self._need = size + length - avail
                    return NEED_DATA
                with memoryview(buf) as view:
                    data = bytes(view[start:start + length])
                start += length
            except MemoryError:
                # No memory for the payload: drop it as it arrives, as for an oversize
                # WRITE; the request has no data, which the server answers with ENOMEM.
                taken = min(length, avail - size)
                self._discard = length - taken
                start += taken
        elif (cmd is Cmd.BLOCK_STATUS and self._extended and flags & _PAYLOAD_LEN
              and length <= MAX_STATUS_PAYLOAD):
            # NBD_FLAG_BLOCK_STAT_PAYLOAD: the payload (u64 effect length, u32 context ids)
            # becomes the request's length and data; validation checks the ids.
            if avail - size < length:
                self._need = size + length - avail
                return NEED_DATA
            data = bytes(buf[start:start + length])
            start += length
            length = _U64.unpack_from(data)[0] if length >= 8 else 0
        elif cmd is Cmd.WRITE or (self._extended and flags & _PAYLOAD_LEN):
            # An oversize WRITE or BLOCK_STATUS payload, or a payload on another command:
            # drop it as it arrives so the stream stays in step; validation answers the error.
            taken = min(length, avail - size)
            self._discard = length - taken
            start += taken
        self._need = 0
        if start == self._end:
            self._pos = self._end = 0
        else:
            self._pos = start
        return _new_request(Request, (cmd, flags, cookie, offset, length, data))


    def _start_direct_payload(self, flags: int, cookie: int, offset: int, length: int,
                              start: int) -> _NeedData:
        """Move what arrived of a big WRITE payload into its final bytes object; the rest
        is received straight into it (get_buffer)."""
        assert self._payload_buffer is not None
        payload, view = self._payload_buffer(length)
        have = self._end - start
        view[:have] = memoryview(self._buffer)[start:self._end]
        self._payload, self._payload_view, self._payload_filled = payload, view, have
        self._payload_header = (flags, cookie, offset, length)
        self._pos = self._end = 0
        self._need = 0
        return NEED_DATA

    def _direct_payload_request(self) -> Request | _NeedData:
        payload = self._payload
        assert payload is not None
        if self._payload_filled < len(payload):
            return NEED_DATA
        self._payload = None
        self._payload_view.release()
        self._payload_view = memoryview(b"")
        flags, cookie, offset, length = self._payload_header
        return Request(Cmd.WRITE, flags, cookie, offset, length, payload)


def validate_request(request: Request, session: Session) -> None:
    """Raise :class:`RequestError` with nbdkit's errno if the request may not reach the plugin."""
    cmd, flags, offset, length = request.cmd, request.flags, request.offset, request.length
    if session.plain.admits(cmd, flags, offset, length):
        return  # the common case: nothing below can apply
    cmd = _CMDS.get(cmd, cmd)  # a Request built by hand may carry a plain int
    sflags = int(session.flags)
    if cmd is Cmd.BLOCK_STATUS and flags & _PAYLOAD_LEN:
        status_payload_ids(request, session)

    if cmd in _WRITES and sflags & _READ_ONLY:
        raise RequestError(errno.EROFS, f"{cmd}: write request on readonly connection")

    if cmd in _RANGED:
        if length == 0 or offset + length > session.size:
            code = errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else errno.EINVAL
            raise RequestError(code, f"{cmd}: offset and count are out of range: "
                                     f"offset={offset} count={length}")
    elif cmd is Cmd.FLUSH:
        if offset != 0 or length != 0:
            raise RequestError(errno.EINVAL, f"{cmd}: expecting offset and count = 0")
    else:
        raise RequestError(errno.EINVAL, f"unknown command ({cmd}) ignored")

    known = _KNOWN_FLAGS | _PAYLOAD_LEN if session.extended_headers else _KNOWN_FLAGS
    if flags & ~known:
        raise RequestError(errno.EINVAL, f"{cmd}: unknown flag (0x{flags & ~known:x})")
    if flags & _PAYLOAD_LEN and cmd not in (Cmd.WRITE, Cmd.BLOCK_STATUS):
        raise RequestError(errno.EINVAL,
                           f"{cmd}: PAYLOAD_LEN flag needs WRITE or BLOCK_STATUS request")
    if flags & _NO_HOLE and cmd is not Cmd.WRITE_ZEROES:
        raise RequestError(errno.EINVAL, f"{cmd}: NO_HOLE flag needs WRITE_ZEROES request")
    if flags & _FAST_ZERO and cmd is not Cmd.WRITE_ZEROES:
        raise RequestError(errno.EINVAL, f"{cmd}: FAST_ZERO flag needs WRITE_ZEROES request")
    if flags & _DF:
        if cmd is not Cmd.READ:
            raise RequestError(errno.EINVAL, f"{cmd}: DF flag needs READ request")
        if not session.structured_replies:
            raise RequestError(errno.EINVAL, f"{cmd}: DF flag needs structured replies")
    if flags & _REQ_ONE and cmd is not Cmd.BLOCK_STATUS:
        raise RequestError(errno.EINVAL, f"{cmd}: REQ_ONE flag needs BLOCK_STATUS request")
    if flags & _FUA and not sflags & _SEND_FUA:
        raise RequestError(errno.EINVAL, "FUA flag not supported")  # as nbdkit

    if cmd in (Cmd.READ, Cmd.WRITE) and length > MAX_REQUEST_SIZE:
        raise RequestError(errno.ENOMEM, f"{cmd}: data request is too large "
                                         f"({length} > {MAX_REQUEST_SIZE})")

    if cmd is Cmd.FLUSH and not sflags & _SEND_FLUSH:
        raise RequestError(errno.EINVAL, f"{cmd}: flush operation not supported")
    if cmd is Cmd.TRIM and not sflags & _SEND_TRIM:
        raise RequestError(errno.EINVAL, f"{cmd}: trim operation not supported")
    if cmd is Cmd.WRITE_ZEROES and not sflags & _SEND_WRITE_ZEROES:
        raise RequestError(errno.EINVAL, f"{cmd}: write zeroes operation not supported")
    if flags & _FAST_ZERO and not sflags & _SEND_FAST_ZERO:
        # After the check of WRITE_ZEROES itself, as nbdkit (which has no message of its
        # own for this: it asserts).
        raise RequestError(errno.EINVAL, f"{cmd}: FAST_ZERO flag not supported")
    if cmd is Cmd.CACHE and not sflags & _SEND_CACHE:
        raise RequestError(errno.EINVAL, f"{cmd}: cache operation not supported")
    if cmd is Cmd.BLOCK_STATUS:
        if not session.structured_replies:
            raise RequestError(errno.EINVAL, f"{cmd}: structured replies was not negotiated")
        if not session.meta_contexts:
            raise RequestError(errno.EINVAL, f"{cmd}: no metadata context was negotiated")


def status_payload_ids(request: Request, session: Session) -> list[int]:
    """The context ids a BLOCK_STATUS payload asks for (NBD_FLAG_BLOCK_STAT_PAYLOAD), each
    selected and none twice; RequestError (EINVAL) otherwise."""
    payload = request.data
    cmd = Cmd.BLOCK_STATUS
    if not int(session.flags) & _BLOCK_STAT_PAYLOAD:
        raise RequestError(errno.EINVAL, f"{cmd}: payload without NBD_FLAG_BLOCK_STAT_PAYLOAD")
    if payload is None:
        raise RequestError(errno.EINVAL, f"{cmd}: payload longer than {MAX_STATUS_PAYLOAD} "
                                         f"bytes")
    if len(payload) < 12 or len(payload) % 4:
        raise RequestError(errno.EINVAL, f"{cmd}: payload of {len(payload)} bytes is not an "
                                         f"effect length and context ids")
    ids = list(struct.unpack_from(f">{(len(payload) - 8) // 4}I", payload, 8))
    selected = {cid for cid, _ in session.meta_contexts}
    for cid in ids:
        if cid not in selected:
            raise RequestError(errno.EINVAL, f"{cmd}: context id {cid} was not selected")
    if len(set(ids)) != len(ids):
        raise RequestError(errno.EINVAL, f"{cmd}: a context id is asked twice")
    return ids
