"""Metadata contexts in negotiation, without state (proto.md "Metadata querying"): the
NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload, which contexts a query names,
and the NBD_REP_META_CONTEXT replies.  The one context served is base:allocation.
"""

from __future__ import annotations

import struct

from luanbd.protocol.constants import BASE_ALLOCATION, MAX_STRING, Opt, Rep
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


def lists_base_allocation(queries: list[bytes]) -> bool:
    """Whether NBD_OPT_LIST_META_CONTEXT with these queries lists base:allocation."""
    # No query means "list all"; "base:" means every context in the base namespace.
    return not queries or any(q in (b"base:", BASE_ALLOCATION) for q in queries)


def selects_base_allocation(queries: list[bytes]) -> bool:
    """Whether NBD_OPT_SET_META_CONTEXT with these queries selects base:allocation."""
    # Only the exact name: "base:", which LIST expands, selects nothing here.
    return BASE_ALLOCATION in queries


def meta_context_replies(opt: Opt, context_id: int | None) -> bytes:
    """NBD_REP_META_CONTEXT for base:allocation with ``context_id`` (none when None), then
    NBD_REP_ACK."""
    parts = [] if context_id is None else [
        option_reply(opt, Rep.META_CONTEXT, _U32.pack(context_id) + BASE_ALLOCATION)]
    parts.append(option_reply(opt, Rep.ACK))
    return b"".join(parts)
