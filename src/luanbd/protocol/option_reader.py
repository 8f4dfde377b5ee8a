"""Option requests off the client's byte stream (proto.md "Option haggling"): the framing
only, as h11 keeps its readers apart from its state machine.

:class:`OptionReader` checks each option header, waits for the whole payload of an option
it will hand over, counts options against nbdkit's limit, and skips the payload of an
option refused unread without buffering it.  Which options are refused is decided by the
caller (the ``refusal`` callback); what an option means is not known here.
"""

from __future__ import annotations

from collections.abc import Callable

from luanbd.protocol.constants import (
    IHAVEOPT,
    MAX_OPTIONS,
    MAX_SKIP_LENGTH,
    OPTION_HEADER,
    Opt,
    Rep,
)
from luanbd.protocol.errors import ProtocolViolation
from luanbd.protocol.events import NEED_DATA, _NeedData
from luanbd.protocol.options import error_reply, option_name

#: Why an option (number, payload length) is refused before its payload is read, or None.
#: May raise ProtocolViolation when the client must be disconnected instead.
Refusal = Callable[[int, int], tuple[Rep, str] | None]


class OptionReader:
    """Reads option requests from :attr:`buffer`, the client's bytes not consumed yet."""

    def __init__(self, refusal: Refusal) -> None:
        self.buffer = bytearray()
        self._refusal = refusal
        #: Set once the client's flags include NBD_FLAG_C_FIXED_NEWSTYLE.
        self.fixed_newstyle = False
        #: Options a client may send without choosing an export (nbdkit MAX_NR_OPTIONS).
        self.option_limit = MAX_OPTIONS
        self._options_seen = 0
        self._skip = 0
        self._skip_reply: bytes | None = None

    def next_option(self) -> tuple[int, bytes] | bytes | _NeedData:
        """The next (option, payload); or the reply to an option refused unread, once its
        payload is past; or NEED_DATA.  Raises :class:`ProtocolViolation`."""
        if self._skip:
            taken = min(self._skip, len(self.buffer))
            del self.buffer[:taken]
            self._skip -= taken
            if self._skip:
                return NEED_DATA
            assert self._skip_reply is not None
            reply, self._skip_reply = self._skip_reply, None
            return reply
        if len(self.buffer) < OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = OPTION_HEADER.unpack_from(self.buffer)
        if magic != IHAVEOPT:
            raise ProtocolViolation(f"unknown option version (0x{magic:x})")
        if not self.fixed_newstyle and option != Opt.EXPORT_NAME:
            # Without fixed newstyle there is no way to refuse an option: only close.
            raise ProtocolViolation(f"option {option_name(option)} needs fixed newstyle")
        if option == Opt.ABORT:
            # Whatever payload follows is irrelevant: the caller acknowledges and closes.
            del self.buffer[:]
            return option, b""
        refusal = self._refusal(option, length)
        if refusal is None and len(self.buffer) < OPTION_HEADER.size + length:
            return NEED_DATA  # counted below once it is complete, however it arrives
        self._options_seen += 1
        if self._options_seen > self.option_limit:
            raise ProtocolViolation("client spent too much time negotiating without "
                                    "selecting an export")
        if refusal is not None:
            if length > MAX_SKIP_LENGTH:
                raise ProtocolViolation(f"option {option_name(option)} payload too long "
                                        f"({length} bytes)")
            del self.buffer[: OPTION_HEADER.size]
            reply = error_reply(option, *refusal)
            if not length:
                return reply
            self._skip = length
            self._skip_reply = reply
            return self.next_option()  # skips what is here already
        end = OPTION_HEADER.size + length
        payload = bytes(self.buffer[OPTION_HEADER.size:end])
        del self.buffer[:end]
        return option, payload
