"""Metadata contexts in negotiation, without state (proto.md "Metadata querying"): the
NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload, which contexts a query names,
and the NBD_REP_META_CONTEXT replies.  The contexts served are base:allocation and those the
backend chain declares (a Lua script's ``meta_contexts``, a filter's), fixed at start-up.
"""

from __future__ import annotations

import struct

from luanbd.protocol.constants import MAX_STRING, Opt, Rep
from luanbd.protocol.errors import OptionError
from luanbd.protocol.options import check_export_name, option_reply

_U32 = struct.Struct(">I")


def parse_meta_context_request(opt: Opt, payload: bytes) -> tuple[bytes, list[bytes]]:
    """The export name and the queries (u32 name length, name, u32 count, then u32 length
    and query each); OptionError when malformed."""
    try:
        (name_length,) = _U32.unpack_from(payload)
        name = payload[4:4 + name_length]
        if len(name) != name_length:
            raise struct.error
        offset = 4 + name_length
        (count,) = _U32.unpack_from(payload, offset)
        offset += 4
        queries = []
        for _ in range(count):
            (query_length,) = _U32.unpack_from(payload, offset)
            offset += 4
            query = payload[offset:offset + query_length]
            if len(query) != query_length or query_length > MAX_STRING:
                raise struct.error
            offset += query_length
            queries.append(query)
    except struct.error:
        raise OptionError(Rep.ERR_INVALID, f"{opt}: invalid payload") from None
    if offset != len(payload):
        raise OptionError(Rep.ERR_INVALID, f"{opt}: length is inconsistent")
    check_export_name(name)
    return name, queries


#: One context id, name pair, as SET_META_CONTEXT selected it.
Selected = tuple[tuple[int, bytes], ...]


def context_id(available: tuple[bytes, ...], name: bytes) -> int:
    """The id of an available context: its place in the server's list, from 1, so that
    base:allocation (always first) keeps id 1 and an id names the same context on every
    connection."""
    return available.index(name) + 1


def listed_contexts(available: tuple[bytes, ...], queries: list[bytes]) -> list[bytes]:
    """Which contexts NBD_OPT_LIST_META_CONTEXT with these queries lists.

    No query means "list all"; a query ending in ``:`` is a prefix ("base:" is the base
    namespace, "qemu:dirty-bitmap:" every bitmap, as qemu's server answers); any other
    query names one context.  Unknown ones are ignored (proto.md)."""
    if not queries:
        return list(available)
    return [name for name in available
            if any(name == q or (q.endswith(b":") and name.startswith(q)) for q in queries)]


def selected_contexts(available: tuple[bytes, ...], queries: list[bytes]) -> Selected:
    """Which contexts NBD_OPT_SET_META_CONTEXT with these queries selects, with their ids.

    Only exact names select: "base:", which LIST expands, selects nothing here (proto.md
    lets a server refuse to select by namespace, and nbdkit and qemu do).  A name given
    twice is selected once, in the order of the queries."""
    chosen: list[bytes] = []
    for q in queries:
        if q in available and q not in chosen:
            chosen.append(q)
    return tuple((context_id(available, name), name) for name in chosen)


def meta_context_replies(opt: Opt, contexts: Selected) -> bytes:
    """NBD_REP_META_CONTEXT for each (id, name), then NBD_REP_ACK."""
    parts = [option_reply(opt, Rep.META_CONTEXT, _U32.pack(cid) + name)
             for cid, name in contexts]
    parts.append(option_reply(opt, Rep.ACK))
    return b"".join(parts)
