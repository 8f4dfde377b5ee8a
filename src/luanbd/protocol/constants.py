"""Every number of the NBD protocol (doc/proto.md of NetworkBlockDevice/nbd), one enum per group.

The enums drop the ``NBD_`` prefix and the group's prefix (``Cmd.READ``), and their ``str()``
prints the spec name (``NBD_CMD_READ``) so log lines name protocol items as the spec does.
"""

from __future__ import annotations

import enum
import struct

# --- Magics -------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes of every greeting
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option header
OLDSTYLE_MAGIC = 0x00420281861253  # cliserv_magic of the oldstyle greeting
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: NBD_OPT_EXTENDED_HEADERS: request and reply magics of the 32-byte extended headers.
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# --- Limits (each with the reason it has this value) --------------------------------------
#: proto.md: strings such as export names "SHOULD" be at most 4096 bytes; nbdkit enforces it.
MAX_STRING = 4096
#: The largest READ/WRITE we serve. libnbd refuses larger requests client-side and nbdkit
#: answers ENOMEM above it, so a bigger limit would only let one client make us allocate more.
MAX_REQUEST_SIZE = 64 * 1024 * 1024
#: READ/WRITE data of this many bytes or more is "large" (not an NBD limit: where luanbd
#: changes strategy): a READ is sent from the Lua string itself (lua/pinning.py), a WRITE
#: payload is received straight into the bytes object the plugin gets; smaller plain
#: requests are the compiled request loop's (server/_fastpath.c).
LARGE_DATA = 64 * 1024
#: nbdkit's MAX_NR_OPTIONS: a client that sends more options than this without choosing an
#: export is wasting our time (slow-loris in the handshake) and is disconnected.
MAX_OPTIONS = 32
#: Largest option payload we buffer (INFO/GO/META_CONTEXT).  Bigger known options are answered
#: NBD_REP_ERR_TOO_BIG and skipped; unknown ones are skipped without buffering.
MAX_OPTION_LENGTH = 64 * 1024
#: Longest option payload we are willing to read past at all; beyond that the client is hostile.
MAX_SKIP_LENGTH = 64 * 1024 * 1024
#: Length of the zero padding after NBD_OPT_EXPORT_NAME's reply and in the oldstyle greeting.
ZERO_PAD = 124

# --- Wire structs (network byte order) ------------------------------------------------------
NEWSTYLE_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
# NBDMAGIC, OLDSTYLE_MAGIC, size, flags (global flags << 16 | transmission flags)
OLDSTYLE_GREETING = struct.Struct(">QQQI")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
#: The payload of an NBD_REPLY_TYPE_OFFSET_DATA chunk: this (the data's offset), then the data.
OFFSET_DATA_PREFIX = struct.Struct(">Q")
EXTENDED_REQUEST_HEADER = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
EXTENDED_REPLY_HEADER = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length


class _SpecName:
    """Mixin: ``str(member)`` prints the spec's name, e.g. ``NBD_CMD_READ``."""

    def __str__(self) -> str:
        name = getattr(self, "name", None) or repr(self)
        return f"NBD_{_PREFIXES[type(self).__name__]}{name}"


class HandshakeFlag(_SpecName, enum.IntFlag):
    """Global flags the server sends in the newstyle greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(_SpecName, enum.IntFlag):
    """Flags the client answers the greeting with."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(_SpecName, enum.IntEnum):
    """Option types of the negotiation phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(_SpecName, enum.IntEnum):
    """Option reply types; the ``ERR_*`` ones have the high bit set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


class Info(_SpecName, enum.IntEnum):
    """Information types of NBD_OPT_INFO / NBD_OPT_GO (NBD_REP_INFO payloads)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(_SpecName, enum.IntFlag):
    """Per-export flags sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    #: Extended headers only: BLOCK_STATUS may carry a payload that picks contexts.
    BLOCK_STAT_PAYLOAD = 1 << 12


class Cmd(_SpecName, enum.IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(_SpecName, enum.IntFlag):
    """Request flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    #: Extended headers only: the length field is the length of a payload that follows.
    PAYLOAD_LEN = 1 << 5


class ReplyType(_SpecName, enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    #: Extended headers only: 64-bit descriptors (u32 context id, u32 count, then
    #: count x (u64 length, u64 status)).
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class ReplyFlag(_SpecName, enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class NbdError(_SpecName, enum.IntEnum):
    """Error values on the wire (they are Linux errno values, but only these)."""

    OK = 0
    PERM = 1
    IO = 5
    NOMEM = 12
    INVAL = 22
    NOSPC = 28
    OVERFLOW = 75
    NOTSUP = 95
    SHUTDOWN = 108

    def __str__(self) -> str:
        return "0" if self is NbdError.OK else f"E{self.name}"


class BlockStatusFlag(_SpecName, enum.IntFlag):
    """Descriptor flags of the ``base:allocation`` meta context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


_PREFIXES = {
    "HandshakeFlag": "FLAG_",
    "ClientFlag": "FLAG_C_",
    "Opt": "OPT_",
    "Rep": "REP_",
    "Info": "INFO_",
    "TransmissionFlag": "FLAG_",
    "Cmd": "CMD_",
    "CmdFlag": "CMD_FLAG_",
    "ReplyType": "REPLY_TYPE_",
    "ReplyFlag": "REPLY_FLAG_",
    "NbdError": "E",
    "BlockStatusFlag": "STATE_",
}

#: The one meta context luanbd serves.
BASE_ALLOCATION = b"base:allocation"
#: Context id we give base:allocation (nbdkit uses 1 too; 0 is what LIST replies carry).
BASE_ALLOCATION_ID = 1
