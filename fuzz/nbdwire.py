"""The client side of NBD on the wire, for the fuzzers: encoders, valid sessions, mutations.

The numbers are written out from the NBD spec (doc/proto.md) rather than imported from
``luanbd.protocol.constants``, so that the fuzz inputs do not inherit a mistake of the code
under test.  Nothing here imports luanbd.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

# --- spec numbers ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71

FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

FLAG_FUA = 1 << 0
FLAG_NO_HOLE = 1 << 1
FLAG_DF = 1 << 2
FLAG_REQ_ONE = 1 << 3
FLAG_FAST_ZERO = 1 << 4
FLAG_PAYLOAD_LEN = 1 << 5

BASE_ALLOCATION = b"base:allocation"
MAX_REQUEST_SIZE = 64 * 1024 * 1024

OPTION_HEADER = struct.Struct(">QII")
REQUEST_HEADER = struct.Struct(">IHHQQI")
EXTENDED_REQUEST_HEADER = struct.Struct(">IHHQQQ")
OPTION_REPLY_HEADER = struct.Struct(">QIII")

#: Values that make length and offset fields interesting (limits of luanbd and of the spec).
INTERESTING_32 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 28, 32, 4095, 4096, 4097, 65535, 65536, 65537,
                  4096 * 1024, MAX_REQUEST_SIZE - 1, MAX_REQUEST_SIZE, MAX_REQUEST_SIZE + 1,
                  2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1)
INTERESTING_64 = (*INTERESTING_32, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 4096, 2**64 - 1)


# --- encoders -------------------------------------------------------------------------------
def client_flags(flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """One option; ``length`` overrides the length field (the payload is sent as given)."""
    n = len(payload) if length is None else length
    return OPTION_HEADER.pack(IHAVEOPT, opt, n) + payload


def info_payload(name: bytes = b"", requests: Sequence[int] = ()) -> bytes:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def meta_payload(name: bytes = b"", queries: Sequence[bytes] = ()) -> bytes:
    """The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def request(cmd: int, *, flags: int = 0, cookie: int = 0, offset: int = 0, length: int = 0,
            data: bytes = b"", extended: bool = False) -> bytes:
    """One request header (classic or extended) followed by ``data``."""
    if extended:
        header = EXTENDED_REQUEST_HEADER.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie,
                                              offset, length)
    else:
        header = REQUEST_HEADER.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return header + data


# --- valid sessions -------------------------------------------------------------------------
@dataclass
class Part:
    """One protocol unit of a client stream, kept apart so mutations can respect units."""

    kind: str  # "flags", "option", "request", "raw"
    data: bytes
    #: Offset of the 32-bit (option) or 32/64-bit (request) length field in ``data``, if any.
    length_at: int | None = None
    length_size: int = 4
    #: Offset of the 64-bit offset field (requests).
    offset_at: int | None = None


@dataclass
class Session:
    """A client session: what it negotiated (so requests can match) and its parts."""

    parts: list[Part] = field(default_factory=list)
    extended: bool = False
    structured: bool = False

    def add_option(self, opt: int, payload: bytes = b"") -> None:
        self.parts.append(Part("option", option(opt, payload), length_at=12))

    def add_request(self, cmd: int, **kw: int | bytes) -> None:
        data = request(cmd, extended=self.extended, **kw)  # type: ignore[arg-type]
        self.parts.append(Part("request", data, length_at=24,
                               length_size=8 if self.extended else 4, offset_at=16))

    def wire(self) -> bytes:
        return b"".join(p.data for p in self.parts)


def valid_session(rng: random.Random, disk_size: int, *, tls_option: bool = True,
                  max_requests: int = 8, max_length: int = 65536) -> Session:
    """A plausible client session against an export of ``disk_size`` bytes: flags, options
    in a libnbd-like order (some of them repeated or shuffled), GO or EXPORT_NAME, then
    requests that are mostly in range."""
    s = Session()
    # mostly what real clients send; sometimes no fixed newstyle (only EXPORT_NAME works)
    flags = rng.choices([3, 1, 0, 2], weights=[80, 12, 4, 4])[0]
    s.parts.append(Part("flags", client_flags(flags)))
    options: list[tuple[int, bytes]] = []
    if tls_option and rng.random() < 0.05:
        options.append((OPT_STARTTLS, b""))
    if rng.random() < 0.7:
        options.append((OPT_STRUCTURED_REPLY, b""))
        s.structured = True
    if rng.random() < 0.4:
        options.append((OPT_EXTENDED_HEADERS, b""))
        s.extended = s.structured = True
    if rng.random() < 0.3:
        options.append((OPT_LIST, b""))
    if rng.random() < 0.3:
        options.append((OPT_LIST_META_CONTEXT,
                        meta_payload(b"", rng.choice([[], [b"base:"], [BASE_ALLOCATION]]))))
    if rng.random() < 0.6:
        queries = rng.choice([[BASE_ALLOCATION], [BASE_ALLOCATION, b"x-foo:bar"], [b"base:"]])
        options.append((OPT_SET_META_CONTEXT, meta_payload(b"", queries)))
    if rng.random() < 0.3:
        options.append((OPT_INFO, info_payload(b"", [INFO_NAME, INFO_BLOCK_SIZE])))
    if rng.random() < 0.1:
        options.append((rng.choice([OPT_PEEK_EXPORT, 12, 99, 2**31]), rng.randbytes(4)))
    if rng.random() < 0.1:
        rng.shuffle(options)
    for opt, payload in options:
        s.add_option(opt, payload)
    end = rng.random()
    if end < 0.75:
        requests = rng.sample([INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE], rng.randint(0, 3))
        s.add_option(OPT_GO, info_payload(export_name(rng), requests))
    elif end < 0.95:
        s.add_option(OPT_EXPORT_NAME, export_name(rng))
        s.structured = s.extended = False  # EXPORT_NAME ends negotiation without either
    else:
        s.add_option(OPT_ABORT)
        return s
    for cookie in range(rng.randint(0, max_requests)):
        add_valid_request(rng, s, disk_size, cookie, max_length)
    if rng.random() < 0.5:
        s.add_request(CMD_DISC, cookie=999)
    return s


def export_name(rng: random.Random) -> bytes:
    """Mostly the default export; sometimes a name, odd bytes, or one at the 4096 limit."""
    return rng.choices([b"", b"foo", rng.randbytes(rng.randint(1, 12)), b"\xff\xfe\x00a",
                        b"n" * 4096, b"n" * 4097], weights=[70, 10, 10, 4, 3, 3])[0]


def add_valid_request(rng: random.Random, s: Session, disk_size: int, cookie: int,
                      max_length: int = 65536) -> None:
    cmd = rng.choice([CMD_READ, CMD_READ, CMD_WRITE, CMD_WRITE, CMD_FLUSH, CMD_TRIM,
                      CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS])
    length = rng.choice([n for n in (1, 512, 4096, 4096, 8192, 65536) if n <= max_length])
    offset = rng.randrange(0, disk_size - length + 1)
    if rng.random() < 0.5:
        offset -= offset % 512
    flags = 0
    if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and rng.random() < 0.3:
        flags |= FLAG_FUA
    if cmd == CMD_WRITE_ZEROES and rng.random() < 0.3:
        flags |= rng.choice([FLAG_NO_HOLE, FLAG_FAST_ZERO])
    if cmd == CMD_READ and s.structured and rng.random() < 0.3:
        flags |= FLAG_DF
    if cmd == CMD_BLOCK_STATUS and rng.random() < 0.3:
        flags |= FLAG_REQ_ONE
    if cmd == CMD_FLUSH:
        offset = length = 0
    data = rng.randbytes(length) if cmd == CMD_WRITE else b""
    if cmd == CMD_WRITE and s.extended and rng.random() < 0.3:
        flags |= FLAG_PAYLOAD_LEN
    s.add_request(cmd, flags=flags, cookie=cookie, offset=offset, length=length, data=data)


# --- mutations ------------------------------------------------------------------------------
def _set_field(part: Part, at: int, size: int, value: int) -> None:
    fmt = ">Q" if size == 8 else ">I"
    value &= (1 << (8 * size)) - 1
    part.data = part.data[:at] + struct.pack(fmt, value) + part.data[at + size:]


def mutate_parts(rng: random.Random, parts: list[Part]) -> list[Part]:
    """Structure-aware mutations: drop, repeat, swap or insert parts; abuse length, offset,
    command and flag fields."""
    parts = [Part(p.kind, p.data, p.length_at, p.length_size, p.offset_at) for p in parts]
    for _ in range(rng.randint(1, 3)):
        if not parts:
            break
        i = rng.randrange(len(parts))
        p = parts[i]
        what = rng.randrange(9)
        if what == 0:
            del parts[i]
        elif what == 1:
            parts.insert(i, Part(p.kind, p.data, p.length_at, p.length_size, p.offset_at))
        elif what == 2 and i + 1 < len(parts):
            parts[i], parts[i + 1] = parts[i + 1], parts[i]
        elif what == 3:
            parts.insert(i, Part("raw", rng.randbytes(rng.randint(1, 40))))
        elif what in (4, 5) and p.length_at is not None:
            values = INTERESTING_64 if p.length_size == 8 else INTERESTING_32
            delta = len(p.data) - p.length_at - p.length_size
            value = rng.choice([*values, delta - 1, delta + 1, delta + rng.randint(-8, 8)])
            _set_field(p, p.length_at, p.length_size, value)
        elif what == 6 and p.offset_at is not None:
            _set_field(p, p.offset_at, 8, rng.choice(INTERESTING_64))
        elif what == 7 and p.kind == "request":
            # flags (16 bits at 4) or command (16 bits at 6)
            at = rng.choice([4, 6])
            value = rng.choice([rng.randrange(65536), 1 << rng.randrange(16), rng.randrange(9)])
            p.data = p.data[:at] + struct.pack(">H", value) + p.data[at + 2:]
        elif what == 7 and p.kind == "option":
            opt = rng.choice([*range(13), 2**31, 2**32 - 1, rng.randrange(2**32)])
            p.data = p.data[:8] + struct.pack(">I", opt) + p.data[12:]
        elif what == 8 and p.kind == "flags":
            p.data = client_flags(rng.choice([0, 1, 2, 3, 4, 2**31, rng.randrange(2**32)]))
    return parts


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Blind mutations: bit flips, byte overwrites, insertions, deletions, truncation."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        what = rng.randrange(6)
        if not buf:
            buf += rng.randbytes(rng.randint(1, 16))
            continue
        i = rng.randrange(len(buf))
        if what == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif what == 1:
            buf[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif what == 2:
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif what == 3:
            del buf[i:i + rng.randint(1, 8)]
        elif what == 4:
            del buf[i:]
        else:
            j = rng.randrange(len(buf))
            n = rng.randint(1, 16)
            buf[i:i] = buf[j:j + n]  # splice a copy of another piece
    return bytes(buf)


def request_headers(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Every (command, flags, offset, length) a server could possibly parse from ``data``:
    each header begins with a request magic, so decode at every place one occurs."""
    for magic, header in ((REQUEST_MAGIC, REQUEST_HEADER),
                          (EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_HEADER)):
        needle = struct.pack(">I", magic)
        at = data.find(needle)
        while at != -1:
            if at + header.size <= len(data):
                _, flags, cmd, _, offset, length = header.unpack_from(data, at)
                yield cmd, flags, offset, length
            at = data.find(needle, at + 1)


def split_option_replies(data: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """Split ``data`` into well-framed option replies ``(option, reply type, payload)`` and
    what follows them (which does not start with the reply magic, or is a cut reply)."""
    replies = []
    at = 0
    while len(data) - at >= OPTION_REPLY_HEADER.size:
        magic, opt, reply, length = OPTION_REPLY_HEADER.unpack_from(data, at)
        end = at + OPTION_REPLY_HEADER.size + length
        if magic != OPTION_REPLY_MAGIC or end > len(data):
            break
        replies.append((opt, reply, data[at + OPTION_REPLY_HEADER.size:end]))
        at = end
    return replies, data[at:]
