"""The option haggling wire format, without state (proto.md "Option haggling"): option
payloads in, option replies out.

Parses the NBD_OPT_INFO / NBD_OPT_GO payload and encodes the replies the server sends:
NBD_REP_INFO (with its NBD_INFO_* payloads) for INFO/GO, NBD_REP_SERVER for NBD_OPT_LIST,
NBD_REP_ERR_* refusals and the reply to NBD_OPT_EXPORT_NAME.  Which reply is due is for
:class:`~luanbd.protocol.handshake.ServerHandshake` to decide.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from luanbd.protocol.constants import (
    EXPORT_NAME_REPLY,
    MAX_STRING,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    ZERO_PAD,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from luanbd.protocol.errors import OptionError, ProtocolViolation

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the caller knows about an opened export, to answer INFO/GO/EXPORT_NAME."""

    size: int
    #: Transmission flags from the backend's capabilities; the handshake adds SEND_DF when
    #: structured replies were negotiated, since only then can the server honour DF.
    flags: TransmissionFlag
    #: Canonical name (NBD_INFO_NAME), e.g. what "" resolves to; None if not known.
    name: bytes | None = None
    description: bytes | None = None
    #: (minimum, preferred, maximum) for NBD_INFO_BLOCK_SIZE, or None.
    block_size: tuple[int, int, int] | None = None


def option_reply(option: int, reply: Rep, payload: bytes = b"") -> bytes:
    """One option reply (header plus payload)."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def error_reply(option: int, reply: Rep, message: str) -> bytes:
    """An NBD_REP_ERR_* refusal; the message is for the client's log."""
    return option_reply(option, reply, message.encode())


def export_name_answer(size: int, flags: TransmissionFlag, zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME (not an option reply: it has no header)."""
    data = EXPORT_NAME_REPLY.pack(size, flags)
    return data + bytes(ZERO_PAD) if zeroes else data


def info_replies(option: Opt, info: ExportInfo, flags: TransmissionFlag,
                 requested: tuple[int, ...]) -> bytes:
    """The answer to NBD_OPT_INFO / NBD_OPT_GO: NBD_INFO_EXPORT (with ``flags``, not
    ``info.flags``), each other requested item that ``info`` knows, then NBD_REP_ACK."""
    parts = [option_reply(option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, info.size, flags))]
    wanted = set(requested)
    if Info.NAME in wanted and info.name is not None:
        parts.append(option_reply(option, Rep.INFO, _U16.pack(Info.NAME) + info.name))
    if Info.DESCRIPTION in wanted and info.description is not None:
        parts.append(option_reply(option, Rep.INFO,
                                  _U16.pack(Info.DESCRIPTION) + info.description))
    if Info.BLOCK_SIZE in wanted and info.block_size is not None:
        parts.append(option_reply(option, Rep.INFO,
                                  _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *info.block_size)))
    parts.append(option_reply(option, Rep.ACK))
    return b"".join(parts)


def server_replies(exports: list[tuple[bytes, bytes]]) -> bytes:
    """The answer to NBD_OPT_LIST: one NBD_REP_SERVER per (name, description), then ACK."""
    parts = [option_reply(Opt.LIST, Rep.SERVER, _U32.pack(len(name)) + name + description)
             for name, description in exports]
    parts.append(option_reply(Opt.LIST, Rep.ACK))
    return b"".join(parts)


def parse_export_name(payload: bytes) -> bytes:
    """The name of an NBD_OPT_EXPORT_NAME payload; ProtocolViolation when it is unfit,
    since this option cannot be refused."""
    if len(payload) > MAX_STRING:
        raise ProtocolViolation(f"export name too long ({len(payload)} bytes)")
    if b"\0" in payload:
        # INFO/GO refuse such a name with ERR_INVALID; EXPORT_NAME cannot be refused,
        # only closed (nbdkit would cut the name at the NUL, a different export).
        raise ProtocolViolation("NBD_OPT_EXPORT_NAME: export name contains a NUL byte")
    return payload


def parse_info_request(opt: Opt, payload: bytes) -> tuple[bytes, tuple[int, ...]]:
    """The export name and the NBD_INFO_* requests of an NBD_OPT_INFO / NBD_OPT_GO payload
    (u32 name length, name, u16 count, u16 each); OptionError when malformed."""
    if len(payload) < 6:
        raise OptionError(Rep.ERR_INVALID, f"{opt}: option too short")
    (name_length,) = _U32.unpack_from(payload)
    if name_length > len(payload) - 6:
        raise OptionError(Rep.ERR_INVALID, f"{opt}: name length is incorrect")
    name = payload[4:4 + name_length]
    (count,) = _U16.unpack_from(payload, 4 + name_length)
    if len(payload) != 6 + name_length + 2 * count:
        raise OptionError(Rep.ERR_INVALID, f"{opt}: length is inconsistent")
    check_export_name(name)
    return name, tuple(struct.unpack_from(f">{count}H", payload, 6 + name_length))


def check_export_name(name: bytes) -> None:
    """Refuse (ERR_INVALID) a name over MAX_STRING or with a NUL byte."""
    if len(name) > MAX_STRING:
        raise OptionError(Rep.ERR_INVALID, f"export name too long ({len(name)} > {MAX_STRING})")
    if b"\0" in name:
        raise OptionError(Rep.ERR_INVALID, "export name contains a NUL byte")


def option_name(option: int) -> str:
    """The spec name of an option, or its number when it is unknown."""
    try:
        return str(Opt(option))
    except ValueError:
        return f"option {option}"
